"""Streaming calibration: statistics gathered while the real model runs, inputs not kept.

    with fxquant.observe(pipe.transformer) as cal:
        pipe(prompts, num_inference_steps=24)           # the model runs as usual
    gm = fxquant.compile(pipe.transformer, "int8-w8a8", calibration=cal)

A forward pre-hook on the module starts one calibration input per call (its timestep read as in
`fxquant.calibrate.timestep_of`) and forward pre-hooks on every ``nn.Linear`` inside fold the
linear's input into `fxquant.stats.RunningStats`, keyed like the compiled module's records
(``name``, ``name#1`` for a module's second call in one forward). ``collect_stats`` fed the same
inputs through the traced graph computes the same statistics (tested bit for bit);
``compile(..., calibration=cal)`` uses these instead of re-running anything.

What is kept (the memory bound, see docs/memory.md):
    a few calls' arguments     ``keep_inputs`` (default 2, at least 1) calls cloned to the CPU,
                               spread over the run; the first is the tracing example, the
                               others feed passes that re-run the model (sensitivity ranking,
                               GPTQ's Hessians): those see only these calls
    running statistics         per linear: in_features float32 channel maxima, plus a few
                               floats per linear and distinct timestep
    a bounded sample           only with ``search_tokens > 0`` (SmoothQuant's alpha search):
                               at most ``search_tokens`` input rows per distinct linear input,
                               in the activation dtype, spread evenly over the calls (q/k/v
                               reading one tensor share one sample)
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any, Iterator, Optional

import torch

from .calibrate import Recorder, timestep_of
from .errors import CalibrationError, is_int
from .stats import RunningStats

SAMPLE_CALLS = 8  # calls a sample is spread over before it thins out (see `Observed._sample`)


class Observed(Sequence):
    """What `observe` gathered: usable as ``calibration=``. As a sequence it holds the few kept
    calls (``keep_inputs``; the first is the tracing example), with ``stats`` (`RunningStats`
    keyed by linear record key), ``calls``, ``timesteps`` (one per call) and ``samples`` (key ->
    rows, only with ``search_tokens``)."""

    def __init__(self, module: torch.nn.Module, search_tokens: int, keep_inputs: int = 2) -> None:
        self._module = module
        self.search_tokens = search_tokens
        # The kept calls, thinned evenly as record_inputs thins (call 0 is always among them).
        self.inputs = Recorder(module, max(1, keep_inputs), max_bytes=1 << 62)
        self.calls = 0
        self.timesteps: list[Optional[float]] = []
        self.stats = RunningStats("observe")
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._stride = 1
        self._kept_calls = 0
        self._seen: dict[str, int] = {}
        self._last: tuple[Any, ...] = ()
        self._keep = False
        self.stride = 1  # observe every stride-th call of the module (set before it runs)
        self._module_calls = 0
        self._active = False

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: Any) -> Any:
        return self.inputs[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inputs)

    def with_inputs(self, inputs: Sequence[Any]) -> "Observed":
        """A shallow copy holding ``inputs`` as its kept calls (the same statistics and samples)."""
        view = copy.copy(self)
        view.inputs = list(inputs)
        return view

    @property
    def example(self) -> Any:
        """The tracing example: the first call's arguments."""
        return self.inputs[0] if len(self.inputs) else None

    def __repr__(self) -> str:
        return f"Observed({self.calls} calls, {len(self.stats.channel)} linears, {self.nbytes() / 2**20:.1f} MiB kept)"

    def sample(self, key: str) -> Optional[torch.Tensor]:
        """The kept input rows of linear ``key`` (float32, at most ``search_tokens``), or None."""
        rows = self.samples.get(key)
        return torch.cat(rows).float()[: self.search_tokens] if rows else None

    def nbytes(self) -> int:
        """Bytes held: the example, the statistics and the samples (shared samples once)."""
        tensors = {id(t): t for rows in self.samples.values() for t in rows}
        example = [t for t in torch.utils._pytree.tree_leaves(list(self.inputs)) if isinstance(t, torch.Tensor)]
        return (sum(t.numel() * t.element_size() for t in list(tensors.values()) + example) + self.stats.nbytes())

    # ------------------------------------------------------------ hooks

    def _call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = self._module_calls % self.stride == 0
        self._module_calls += 1
        if not self._active:
            return
        i = self.calls
        self.calls += 1
        where = f"observe({type(module).__name__}) call {i}"
        t = timestep_of(module.forward, args, kwargs, where)
        self.timesteps.append(t)
        self.inputs._hook(module, args, kwargs)
        self.stats.begin(i, t)
        self._seen, self._last = {}, ()
        self._keep = self.search_tokens > 0 and self._sample_call(i)

    def _sample_call(self, i: int) -> bool:
        """Whether call ``i`` adds rows; past SAMPLE_CALLS kept calls, every other kept call's rows
        go and the stride doubles (as `record_inputs` thins its items): bounded, evenly spread."""
        if i % self._stride:
            return False
        if self._kept_calls == SAMPLE_CALLS:
            self.samples = {k: v[::2] for k, v in self.samples.items()}
            self._kept_calls = (SAMPLE_CALLS + 1) // 2
            self._stride *= 2
            if i % self._stride:
                return False
        self._kept_calls += 1
        return True

    def _linear(self, name: str, x: torch.Tensor) -> None:
        if not self._active:
            return
        n = self._seen[name] = self._seen.get(name, -1) + 1
        key = f"{name}#{n}" if n else name
        self.stats.add(key, x, "call")
        if self._keep:
            if self._last and self._last[0]() is x and self._last[1] == x._version:
                rows = self._last[2]  # q/k/v read one tensor: one sample
            else:
                x2d = x.detach().reshape(-1, x.shape[-1])
                per = -(-self.search_tokens // SAMPLE_CALLS)
                idx = torch.linspace(0, x2d.shape[0] - 1, min(per, x2d.shape[0])).round().long()
                rows = x2d[idx].to("cpu", copy=True)
                self._last = (weakref.ref(x), x._version, rows)
            self.samples.setdefault(key, []).append(rows)


class observe:  # noqa: N801 - used as a context manager, reads like a function
    """Gather calibration statistics from a module's calls while ordinary code runs.

    Args:
        module: the transformer (one CFG branch). Not modified beyond forward pre-hooks on it
            and its ``nn.Linear`` submodules, removed on exit.
        search_tokens: input rows kept per linear input for SmoothQuant's alpha search (0: none;
            only recipes with ``alpha_search`` need them).
        keep_inputs: calls whose arguments are kept, spread evenly over the run (as
            `record_inputs` keeps them), for passes that must re-run the model: protection by
            sensitivity measures output error on them, GPTQ builds its Hessians from them. At
            least the first call is always kept: it is the tracing example.

    Returns (on ``__enter__``):
        An `Observed`, usable as ``compile(..., calibration=...)`` once the block has run.

    Raises:
        CalibrationError: a NaN/Inf activation (naming the linear and the call), a bad
            ``search_tokens``, or arguments that cannot be bound.

    Example:
        >>> with fxquant.observe(model) as cal:  # doctest: +SKIP
        ...     for t in (0.2, 0.5, 0.8):
        ...         model(**inputs_at(t))
        >>> gm = fxquant.compile(model, "int8-w8a8", calibration=cal)  # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module, search_tokens: int = 0, keep_inputs: int = 2) -> None:
        if not isinstance(module, torch.nn.Module):
            raise CalibrationError(f"observe: expected an nn.Module, got {type(module).__name__}")
        for name, v in (("search_tokens", search_tokens), ("keep_inputs", keep_inputs)):
            if not is_int(v):
                raise CalibrationError(f"observe: {name} must be an integer >= 0, got {v!r}")
        self.observed = Observed(module, search_tokens, keep_inputs)
        self._handles: list[Any] = []

    def __enter__(self) -> Observed:
        obs, root = self.observed, self.observed._module
        self._handles.append(root.register_forward_pre_hook(obs._call, with_kwargs=True))
        for name, m in root.named_modules():
            if isinstance(m, torch.nn.Linear):
                self._handles.append(m.register_forward_pre_hook(
                    lambda _m, args, _name=name: obs._linear(_name, args[0]) if args else None))
        return obs

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
