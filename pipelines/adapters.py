"""Adapters (LoRAs) as experts: "the base network with adapter k active at scale s_k".

An adapter expert is one row block of the pipeline's own denoiser network (the UNet of
SD 1.x/2.x and SDXL, the transformer of SD3 and Flux). All of a call's experts
and their unconditional branches still run in ONE batched forward per step: each row of
the batch carries the index of its adapter in its condition (``cond["adapter"]``), and
the forward runs under PEFT's mixed-adapter batches (every LoRA layer computes

    y[rows of k] = W x[rows of k] + s_k (alpha_k / r_k) B_k A_k x[rows of k],

rows without an adapter use W alone), which equals running each row with only its own
adapter active (float rounding aside). Each adapter expert is guided by its own
unconditional row (the same adapter, the negative prompt), as when one LoRA is loaded into
diffusers: p_k = u_k + w (c_k - u_k).

Multi-LoRA baselines behind the same ``operator=`` switch (``METHODS``):
    or, and, average, single   SuperDiff / the core operators over the adapter experts
    composite                  LoRA Composite (Zhong et al. 2024): the average of every
                               adapter's guided prediction, (1/K) sum_k [u_k + w (c_k - u_k)]
    merge                      weight merge (diffusers' ``set_adapters(names, weights)``):
                               one expert whose every layer adds sum_k s_k B_k A_k
    switch                     LoRA Switch: one expert whose adapter is adapter
                               (step // switch_every) mod K at each step

Adapters load with diffusers' ``load_lora_weights`` (safetensors; kohya and diffusers/PEFT
formats as diffusers accepts them). Every entry is checked before anything is loaded or
computed: the file exists (and is safetensors where only safetensors are allowed), its
layers exist in this pipeline's network with the same widths (an adapter for another base
architecture is refused), and one adapter name never stands for two different files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

__all__ = ["AdapterExpert", "AdapterSpec", "AdapterRouting", "METHODS", "ADAPTER_METHODS", "resolve_adapters",
           "load_adapters", "plan_adapter_experts", "route_branches", "adapter_forward", "routed_forward", "routed_unet_forward",
           "denoiser_of", "check_architecture",
           "mixed_adapter_batch", "merged_adapters", "weight_file",
           "file_sha256", "BASE"]

#: The row label of "no adapter" in PEFT's mixed batches.
BASE = "__base__"
#: Methods only adapter experts have (the others are the core operators).
ADAPTER_METHODS = ("merge", "switch", "composite")
METHODS = ("or", "and", "average", "single", *ADAPTER_METHODS)
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight", ".lora_A.bias",
             ".lora_B.bias", ".alpha", ".lora_magnitude_vector")


@dataclass
class AdapterExpert:
    """One adapter expert: the LoRA at `path` (a file, or a folder holding
    pytorch_lora_weights.safetensors; a bundled name such as "lora-orange" also works) at
    `scale`, under `prompt` (None: one expert per pipeline prompt). `name` is the adapter's
    name in the network (default: the folder or file name without suffix). path None: the
    base network without adapter (for an expert with its own prompt next to adapter experts)."""

    path: str | os.PathLike | None
    scale: float = 1.0
    prompt: str | None = None
    negative_prompt: str | None = None
    name: str | None = None


@dataclass
class AdapterSpec:
    """A checked adapter: resolved weight file, its sha256, the network adapter name."""

    name: str
    file: Path | None
    sha256: str
    scale: float
    prompt: str | None = None
    negative_prompt: str | None = None
    source: str = ""

    def describe(self) -> dict[str, Any]:
        """What a PNG or trace records about this adapter."""
        return {"name": self.name, "path": self.source, "scale": self.scale, "sha256": self.sha256}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_file(path: str | os.PathLike, safetensors_only: bool = False) -> Path:
    """The LoRA weight file of an adapter entry: the file itself, the one weight file of a
    folder (pytorch_lora_weights.safetensors), or a bundled adapter's; refused with the reason."""
    p = Path(path)
    if not p.exists():
        from superdiff.registry import BUNDLED_ROOT

        bundled = BUNDLED_ROOT / str(path)
        if os.sep not in str(path) and bundled.is_dir():
            p = bundled
        else:
            raise ValueError(f"adapter {str(path)!r} not found: give a LoRA .safetensors file, a folder holding "
                             "pytorch_lora_weights.safetensors, or a bundled adapter name (lora-orange, lora-outline)")
    if p.is_dir():
        found = [p / n for n in WEIGHT_NAMES if (p / n).is_file()]
        if not found:
            found = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if len(found) != 1 and not (found and found[0].name in WEIGHT_NAMES):
            raise ValueError(f"adapter folder {str(p)!r} holds {len(found)} weight files; expected one "
                             "(pytorch_lora_weights.safetensors): give the file itself")
        p = found[0]
    if p.suffix != ".safetensors":
        if safetensors_only:
            raise ValueError(f"adapter {str(p)!r} is not a .safetensors file; only safetensors adapters are "
                             "loaded here (pickled .bin/.pt files can run code): convert it to safetensors")
        if p.suffix not in (".bin", ".pt", ".pth"):
            raise ValueError(f"adapter {str(p)!r} is not a LoRA weight file (.safetensors, or .bin as diffusers "
                             "saves them)")
    return p


def _as_expert(entry: Any) -> AdapterExpert | None:
    if entry is None or isinstance(entry, AdapterExpert):
        return entry
    if isinstance(entry, (str, os.PathLike)):
        return AdapterExpert(entry)
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"path", "scale", "prompt", "negative_prompt", "name"}
        if unknown or "path" not in entry:
            raise ValueError(f"adapter entry {dict(entry)!r}: give 'path' and optionally 'scale', 'prompt', "
                             f"'negative_prompt', 'name' (unknown: {sorted(unknown)})")
        return AdapterExpert(**entry)
    if isinstance(entry, tuple) and len(entry) == 2:
        return AdapterExpert(entry[0], float(entry[1]))
    raise ValueError(f"cannot use {type(entry).__name__} as an adapter expert; give a path, (path, scale), a dict "
                     "or superdiff.pipelines.adapters.AdapterExpert (None: the base network without adapter)")


def resolve_adapters(entries: Sequence[Any] | Any, safetensors_only: bool = False) -> list[AdapterSpec | None]:
    """Normalise and check `adapters` entries (no loading): files, formats, names, scales.
    None stays None (an expert on the base network without adapter)."""
    if isinstance(entries, (str, os.PathLike, AdapterExpert, Mapping)):
        entries = [entries]
    specs: list[AdapterSpec | None] = []
    by_name: dict[str, str] = {}
    for k, raw in enumerate(entries):
        e = _as_expert(raw)
        if e is None:
            specs.append(None)
            continue
        if e.path is None:  # the base network under its own prompt
            specs.append(AdapterSpec(BASE, None, "", 1.0, e.prompt, e.negative_prompt, BASE))
            continue
        try:
            scale = float(e.scale)
        except (TypeError, ValueError):
            raise ValueError(f"adapter {k} ({e.path}): scale must be a number, got {e.scale!r}") from None
        if not torch.isfinite(torch.tensor(scale)):
            raise ValueError(f"adapter {k} ({e.path}): scale must be finite, got {scale}")
        f = weight_file(e.path, safetensors_only)
        name = e.name or (f.parent.name if f.name in WEIGHT_NAMES else f.stem)
        if not name or name == BASE or "." in name:
            raise ValueError(f"adapter {k}: {name!r} cannot be an adapter name (no dots; not {BASE!r})")
        sha = file_sha256(f)
        if by_name.setdefault(name, sha) != sha:
            raise ValueError(f"two experts name the adapter {name!r} for different files ({f} differs from the "
                             "first); give one of them another name")
        specs.append(AdapterSpec(name, f, sha, scale, e.prompt, e.negative_prompt, str(e.path)))
    return specs


def _lora_keys(pipe: Any, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter's state dict as diffusers reads it (kohya and other formats converted)."""
    try:
        out = pipe.lora_state_dict(str(spec.file))
    except Exception as err:  # noqa: BLE001 - any reader error is a bad adapter file
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) is not a LoRA diffusers can read: {err}") from err
    return out[0] if isinstance(out, tuple) else out


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """(component name, module) of the pipeline's denoiser network: "unet" for the SD
    pipelines, "transformer" for SD3 / Flux (the prefix of its keys in a LoRA file)."""
    name = getattr(pipe, "_denoiser_name", "unet")
    return name, getattr(pipe, name)


def _module_path(key: str, prefix: str = "unet") -> str:
    """The network module a LoRA tensor belongs to: "<prefix>.<path>.lora_A.weight" -> "<path>"."""
    path = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
    for suf in _SUFFIXES:
        if path.endswith(suf):
            return path[: -len(suf)]
    return path


_FAMILY = {"unet": "a UNet (Stable Diffusion 1.x/2.x or SDXL)",
           "transformer": "a transformer (Stable Diffusion 3 or Flux)"}


def check_architecture(pipe: Any, spec: AdapterSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an adapter whose layers do not exist, with the same widths, in this pipeline's
    denoiser network (an adapter for another base architecture), which adapts a text encoder,
    or which is not a plain LoRA (a row-by-row routed forward needs x -> W x + s B A x)."""
    prefix, net = denoiser_of(pipe)
    kind = _FAMILY.get(prefix, f"its {prefix}")
    modules = dict(net.named_modules())
    parts = sorted({k.split(".")[0] for k in state if not k.startswith(prefix + ".")})
    te = [p for p in parts if p.startswith("text_encoder")]
    other = [p for p in parts if p not in te]
    unknown = [p for p in other if p not in _FAMILY]
    if unknown:  # e.g. kohya keys that this pipeline's loader does not convert
        example = next(k for k in state if k.split(".")[0] == unknown[0])
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) is not in a layout diffusers' "
                         f"{type(pipe).__name__} loader maps to its components: keys such as {example!r} name "
                         f"no {prefix} or text-encoder layer (a LoRA for another model, or a format diffusers "
                         "converts only for other pipelines)")
    if other:
        fam = " or ".join(_FAMILY[p] for p in other)
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) was trained for another base architecture: its "
                         f"layers belong to {fam} ({', '.join(o + '.*' for o in other)}), this "
                         f"{type(pipe).__name__}'s network is {kind}; use a LoRA made for this model")
    if te:
        raise ValueError(f"adapter {spec.name!r} adapts {', '.join(te)} as well as the {prefix}; adapter experts "
                         f"support {prefix}-only LoRAs (the text-encoder part would be shared by every expert)")
    dora = sorted({_module_path(k, prefix) for k in state if k.endswith(("lora_magnitude_vector", "dora_scale"))})
    foreign = sorted(k for k in state if k.startswith(prefix + ".") and not k.endswith(_SUFFIXES))
    if dora or foreign:
        what = (f"DoRA magnitudes ({dora[0]}, ...)" if dora else
                f"weights that replace the network's own ({foreign[0]}, ...; e.g. a Flux Control LoRA's norms)")
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) holds {what}: adapter experts route plain LoRA "
                         "layers (x -> W x + s B A x) row by row; give a plain LoRA")
    bad, n = [], 0
    for key, w in state.items():
        if not key.startswith(prefix + "."):
            continue
        path = _module_path(key, prefix)
        n += 1
        m = modules.get(path)
        base = getattr(m, "base_layer", m)
        if m is None:
            bad.append(f"{path} (no such layer)")
            continue
        if key.endswith(("lora_A.weight", "lora.down.weight")):
            want = getattr(base, "in_features", getattr(base, "in_channels", None))
            if w.dim() < 2 or want != w.shape[1]:
                bad.append(f"{path} (input width {w.shape[1] if w.dim() > 1 else '?'}, the layer has {want})")
        elif key.endswith(("lora_B.weight", "lora.up.weight")):
            want = getattr(base, "out_features", getattr(base, "out_channels", None))
            if want != w.shape[0]:
                bad.append(f"{path} (output width {w.shape[0]}, the layer has {want})")
    if n == 0:
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) holds no {prefix} LoRA layers diffusers recognises")
    if bad:
        shown = list(dict.fromkeys(bad))  # a missing layer is named once, not per tensor
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) was trained for another base architecture: "
                         f"{len(bad)} of its {n} {prefix} tensors do not fit this pipeline's {prefix}, e.g. "
                         f"{'; '.join(shown[:3])}")


def load_adapters(pipe: Any, specs: Sequence[AdapterSpec | None]) -> None:
    """Check every adapter against the pipeline's denoiser network, then load the ones not
    loaded yet with diffusers' `load_lora_weights` (the pipeline's own LoRA loader mixin;
    nothing is loaded if any check fails). Loaded adapters are left inactive for ordinary
    calls: only the routed forward uses them."""
    prefix, net = denoiser_of(pipe)
    todo, layers = [], {}
    loaded: dict[str, str] = getattr(pipe, "_superdiff_adapters", {})
    for spec in specs:
        if spec is None or spec.name == BASE or any(s.name == spec.name for s in todo):
            continue
        state = _lora_keys(pipe, spec)
        check_architecture(pipe, spec, state)
        layers[spec.name] = {_module_path(k, prefix) for k in state if k.startswith(prefix + ".")}
        if loaded.get(spec.name) != spec.sha256:
            todo.append(spec)
    if not todo:
        return
    peft_names = set(getattr(net, "peft_config", {}) or {})
    try:
        _load(pipe, net, todo, layers, loaded, peft_names)
    finally:  # also after a refused file: loaded adapters stay off for ordinary calls
        pipe._superdiff_adapters = loaded
        if getattr(net, "peft_config", None):
            net.disable_adapters()


def _load(pipe: Any, net: torch.nn.Module, todo: Sequence[AdapterSpec], layers: Mapping[str, set],
          loaded: dict[str, str], peft_names: set) -> None:
    from peft.tuners.lora import LoraLayer

    for spec in todo:
        if spec.name in peft_names:
            pipe.delete_adapters(spec.name)
        loaded.pop(spec.name, None)
        pipe.load_lora_weights(str(spec.file.parent), weight_name=spec.file.name, adapter_name=spec.name)
        got = {n for n, m in net.named_modules() if isinstance(m, LoraLayer) and spec.name in m.lora_A}
        if got != layers[spec.name]:  # diffusers skips what it cannot map: refuse a partial adapter
            pipe.delete_adapters(spec.name)
            missing = sorted(layers[spec.name] - got)
            raise ValueError(f"adapter {spec.name!r} ({spec.file}): diffusers loaded {len(got)} of its "
                             f"{len(layers[spec.name])} layers (not loaded: {missing[:3]}); the file mixes key "
                             "formats or names layers this network lacks")
        loaded[spec.name] = spec.sha256


@contextlib.contextmanager
def _enabled(net: torch.nn.Module, scales: Mapping[str, float]) -> Iterator[None]:
    """LoRA layers switched on, adapter `name` at scale scales[name]; restored after."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    was_disabled = [m.disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = False
        for name, s in scales.items():
            if name in m.lora_A or name in getattr(m, "lora_embedding_A", {}):
                m.set_scale(name, float(s))
    try:
        yield
    finally:
        for m, d in zip(layers, was_disabled):
            m._disable_adapters = d
            for name in scales:
                if name in m.lora_A or name in getattr(m, "lora_embedding_A", {}):
                    m.set_scale(name, 1.0)


@contextlib.contextmanager
def mixed_adapter_batch(net: torch.nn.Module, row_adapters: Sequence[str], scales: Mapping[str, float]) -> Iterator[None]:
    """Run `net` with row i of every LoRA layer's input using adapter row_adapters[i] only
    (BASE: none), PEFT's mixed-adapter batches, at the given per-adapter scales."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(row_adapters)

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules()
               if isinstance(m, BaseTunerLayer)]
    try:
        with _enabled(net, scales):
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def merged_adapters(net: torch.nn.Module, scales: Mapping[str, float]) -> Iterator[None]:
    """Every adapter in `scales` active at once (weight merge: each layer adds
    sum_k s_k B_k A_k x), as diffusers' set_adapters(names, weights)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    before = [list(m.active_adapters) for m in layers]
    for m in layers:
        m.set_adapter([n for n in scales if n in m.lora_A], inference_mode=True)
    try:
        with _enabled(net, scales):
            yield
    finally:
        for m, a in zip(layers, before):
            m.set_adapter(a, inference_mode=True)


@dataclass
class AdapterRouting:
    """How the pipeline network's rows use adapters in one call.

    names: adapter names indexed by cond["adapter"] (index 0 is BASE); scales: per name.
    mode: "rows" (each row its own adapter), "merge" (all adapters summed) or "switch"
    (one adapter for all rows, changing every `switch_every` steps along `grid`).
    """

    names: list[str] = field(default_factory=lambda: [BASE])
    scales: dict[str, float] = field(default_factory=dict)
    mode: str = "rows"
    switch_every: int = 1
    grid: torch.Tensor | None = None
    specs: list[AdapterSpec] = field(default_factory=list)

    def index(self, name: str | None) -> int:
        return self.names.index(name or BASE)

    def switch_adapter(self, t: torch.Tensor) -> str:
        """LoRA Switch: the adapter of the step whose grid time is nearest to t."""
        step = int(torch.argmin((self.grid.to(torch.float64) - float(t)).abs())) if self.grid is not None else 0
        adapters = self.names[1:]
        return adapters[(step // self.switch_every) % len(adapters)]

    def context(self, net: torch.nn.Module, rows: torch.Tensor | None, t: torch.Tensor, n: int):
        if self.mode == "merge":
            return merged_adapters(net, self.scales)
        if self.mode == "switch":
            return mixed_adapter_batch(net, [self.switch_adapter(t)] * n, self.scales)
        return mixed_adapter_batch(net, [self.names[int(i)] for i in rows.tolist()], self.scales)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.specs]


def adapter_forward(fn: Any, net: torch.nn.Module, routing: AdapterRouting) -> Any:
    """Wrap a network fn(x, t, cond) so that each call runs the routed adapters (one forward).
    cond["adapter"] (the rows' adapter indices) stays on the CPU: reading it is no device sync.
    fn's `set_grid` (the time inputs of a sampling grid, computed once) is kept."""

    def routed(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        rows = None
        if isinstance(cond, Mapping) and "adapter" in cond:
            cond = dict(cond)
            rows = cond.pop("adapter")
        with routing.context(net, rows, t, x.shape[0]):
            return fn(x, t, cond)

    if hasattr(fn, "set_grid"):
        routed.set_grid = fn.set_grid  # type: ignore[attr-defined]
    return routed


def plan_adapter_experts(specs: Sequence[AdapterSpec | None], plans: Sequence[Any], prompts: Sequence[str],
                         negatives: Sequence[str | None], method: str, switch_every: int = 1
                         ) -> tuple[str, list[Any], AdapterRouting]:
    """Replace the pipeline-network prompt experts (network 0) by adapter experts.

    Each adapter (None: the base network) gives one expert per prompt, or one for its own
    prompt; the other networks' experts (extra_unets) follow unchanged. Returns the core
    operator name, the expert plans (each with `.adapter` set) and the routing.
    """
    from ._experts import ExpertPlan

    method = method.lower() if isinstance(method, str) else method
    specs = list(specs)
    routing = AdapterRouting()
    # one network adapter name per (file, scale): the same file at two scales loads twice
    for s in specs:
        if s is None or s.name == BASE:
            continue
        if s.name in routing.scales and routing.scales[s.name] != s.scale:
            s.name = f"{s.name}_x{s.scale:g}".replace(".", "p").replace("-", "m")
        if s.name not in routing.names:
            routing.names.append(s.name)
            routing.scales[s.name] = s.scale
            routing.specs.append(s)
    others = [p for p in plans if p.network != 0]
    shared_neg = negatives[0] if len(set(negatives)) == 1 else None
    out: list[Any] = []

    def add(spec: AdapterSpec | None, prompt: str, neg: str | None) -> None:
        base = spec is None or spec.name == BASE
        label = "base" if base else (spec.name if spec.scale == 1 else f"{spec.name}@{spec.scale:g}")
        out.append(ExpertPlan(0, prompt, neg, name=f"{label}: {prompt}", adapter=None if base else spec.name))

    if isinstance(method, str) and method in ("merge", "switch"):
        adapters = [s for s in specs if s is not None and s.name != BASE]
        if not adapters or len(adapters) != len(specs):
            raise ValueError(f"operator {method!r} combines adapters into one expert: give only adapters "
                             "(no None / base entries)")
        own = {s.prompt for s in adapters}
        if len(own) > 1 or (None in own and len(set(prompts)) > 1):
            raise ValueError(f"operator {method!r} makes one expert: give one prompt (the adapters' own prompts "
                             f"differ: {sorted(map(str, own))})")
        prompt = adapters[0].prompt or prompts[0]
        neg = adapters[0].negative_prompt or shared_neg or negatives[0]
        p = ExpertPlan(0, prompt, neg, name=f"{method}({', '.join(routing.names[1:])}): {prompt}")
        routing.mode = method
        routing.switch_every = int(switch_every)
        if routing.switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {switch_every}")
        return "single", [p, *others], routing
    for s in specs:
        if s is not None and s.prompt is not None:
            neg = s.negative_prompt if s.negative_prompt is not None else (
                negatives[prompts.index(s.prompt)] if s.prompt in prompts else shared_neg)
            add(s, s.prompt, neg)
        else:
            for i, pr in enumerate(prompts):
                add(s, pr, s.negative_prompt if s is not None and s.negative_prompt is not None else negatives[i])
    core = "average" if method == "composite" else method
    return core, [*out, *others], routing


def route_branches(branches: Sequence[Any], plans: Sequence[Any], routing: AdapterRouting) -> list[Any]:
    """Tag each pipeline-network branch's condition rows with its adapter index; an adapter
    expert's unconditional row uses its adapter too (so it is its own row block)."""
    from superdiff.diffusers_experts import Branch

    out = []
    for b, p in zip(branches, plans):
        if b.network != 0 or b.cond is None:
            out.append(b)
            continue
        idx = torch.tensor([routing.index(p.adapter)])  # on the CPU: never sent to the network

        def tag(c: Any) -> Any:
            return None if c is None else {**c, "adapter": idx}

        key = None if b.uncond_key is None else (b.uncond_key, routing.names[int(idx)])
        out.append(Branch(b.network, tag(b.cond), tag(b.uncond), key, b.name))
    return out


def routed_forward(net: torch.nn.Module, routing: AdapterRouting, grid: torch.Tensor | None,
                   base_forward: Any) -> Any:
    """`prepare_networks`' forward(module) for any pipeline: base_forward(module) gives a
    network's fn(x, t, cond) (unet_forward, transformer_forward); the pipeline's own denoiser
    `net` is routed through its adapters, any other network runs as usual. `grid`: the
    call's time grid (LoRA Switch counts steps along it)."""
    routing.grid = grid

    def forward(module: torch.nn.Module) -> Any:
        fn = base_forward(module)
        return adapter_forward(fn, module, routing) if module is net else fn

    return forward


def routed_unet_forward(unet: torch.nn.Module, routing: AdapterRouting, method: Any,
                        cross_attention_kwargs: dict | None = None) -> Any:
    """routed_forward for the UNet pipelines (`method`: the call's MethodPlan)."""
    from superdiff.diffusers_experts import unet_forward

    return routed_forward(unet, routing, method.grid,
                          lambda module: unet_forward(module, method.schedule, cross_attention_kwargs))
