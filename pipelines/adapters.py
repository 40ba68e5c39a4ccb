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
    switch                     LoRA Switch: one expert whose adapter is entry
                               (step // switch_every) mod K at each step (every evaluation
                               of the step, Heun's second included)

diffusers' own LoRA scale (cross_attention_kwargs / joint_attention_kwargs {"scale": s})
multiplies every routed adapter's scale, as diffusers multiplies its active adapters'.

Adapters load with diffusers' ``load_lora_weights`` (safetensors; kohya and diffusers/PEFT
formats as diffusers accepts them). Every entry is checked before anything is loaded or
computed: the file exists (and is safetensors where only safetensors are allowed), its
layers exist in this pipeline's network with the same widths (an adapter for another base
architecture is refused), and one adapter name never stands for two different files.
Adapters the user loaded stay as they were: never deleted or replaced, active at their
weights and switched on or off as before every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

__all__ = ["AdapterExpert", "AdapterSpec", "AdapterRouting", "METHODS", "ADAPTER_METHODS", "resolve_adapters", "plan_adapters",
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
    #: the routing key: `name`, or name_x<scale> for the same file at a second scale (rows, switch)
    key: str = ""
    #: the adapter's name in the network, set when loaded: `key`, or a fresh name where the user's
    #: own adapter holds that name
    loaded_as: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    def describe(self) -> dict[str, Any]:
        """What a PNG or trace records about this adapter."""
        return {"name": self.name, "path": self.source, "scale": self.scale, "sha256": self.sha256}


_SHA256: dict[tuple[str, int, int, bool], str] = {}  # (resolved path, size, mtime in ns, after header) -> digest


def file_sha256(path: str | os.PathLike, after_header: bool = False) -> str:
    """The file's sha256 (hex), read once per version of the file: a file whose size or
    modification time changed is hashed again (every image of a run records its adapters'
    hashes, and a studio or batch run makes many). after_header: of a safetensors file's bytes
    after its header (the 8-byte length and the JSON metadata that tools rewrite), as A1111's
    LoRA hash (superdiff.a1111.lora_short_hash)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, after_header)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            if after_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


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


def _network_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The denoiser's part of a LoRA state dict under PEFT's key names, as the network's loader
    (`load_lora_adapter`) maps them with diffusers' `convert_unet_state_dict_to_peft`: e.g. a
    converted kohya file's "<attn>.processor.to_q_lora.down.weight" -> "<attn>.to_q.lora_A.weight"."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return {f"{prefix}.{k}": v for k, v in convert_unet_state_dict_to_peft(own).items()}


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
    state = _network_state(state, prefix)
    foreign = sorted(k for k in state if not k.endswith(_SUFFIXES))
    if dora or foreign:
        what = (f"DoRA magnitudes ({dora[0]}, ...)" if dora else
                f"weights that replace the network's own ({foreign[0]}, ...; e.g. a Flux Control LoRA's norms)")
        raise ValueError(f"adapter {spec.name!r} ({spec.file}) holds {what}: adapter experts route plain LoRA "
                         "layers (x -> W x + s B A x) row by row; give a plain LoRA")
    bad, n = [], 0
    for key, w in state.items():
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


def _lora_layers(net: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


@dataclass
class _LayerState:
    """What diffusers' set_adapters / enable_lora / disable_lora set in one LoRA layer: its
    active adapters, their scales and whether the layer is switched off (PEFT's own fields,
    written back as they were: PEFT's setters would also change requires_grad)."""

    layer: Any
    active: list[str]
    disabled: bool
    scaling: dict[str, float]

    @classmethod
    def of(cls, net: torch.nn.Module) -> list["_LayerState"]:
        return [cls(m, list(m.active_adapters), bool(m.disable_adapters), dict(m.scaling)) for m in _lora_layers(net)]

    def restore(self) -> None:
        self.layer._active_adapter = list(self.active)
        self.layer._disable_adapters = self.disabled
        self.layer.scaling.update(self.scaling)


def _restore_user_state(net: torch.nn.Module, before: Sequence[_LayerState]) -> None:
    """The network's adapters as the user left them before SuperDiff loaded its own: every layer
    that existed back as it was; a layer made for SuperDiff's adapters with the active set and
    on/off state the other layers had, so that SuperDiff's adapters act only in its routed
    forward. When the network had no LoRA layers, the new ones are switched on with no active
    adapter: the plain network, as before, and an adapter the user loads or activates later
    acts as in diffusers (diffusers' load_lora_weights / set_adapters never switch a layer
    back on, so a switched-off layer would silently ignore it, and enable_lora() would have
    turned SuperDiff's last adapter on)."""
    for s in before:
        s.restore()
    old = {id(s.layer) for s in before}
    active, disabled = (list(before[0].active), before[0].disabled) if before else ([], False)
    for m in _lora_layers(net):
        if id(m) not in old:
            m._active_adapter = list(active)
            m._disable_adapters = disabled


def _network_name(key: str, ours: Mapping[str, Any], held: set, taken: set) -> str:
    """The network adapter name for the adapter `key`: `key` itself unless the user's own adapter
    (one SuperDiff did not load) holds it, then key_superdiff, key_superdiff2, ...; a name SuperDiff
    loaded before is reused (the same file) or reloaded (another file)."""
    for i in range(1, len(held) + len(taken) + 2):
        name = key if i == 1 else f"{key}_superdiff" + ("" if i == 2 else str(i - 1))
        if name not in taken and (name in ours or name not in held):
            return name
    raise AssertionError("unreachable: a free adapter name always exists")


def load_adapters(pipe: Any, specs: Sequence[AdapterSpec | None]) -> None:
    """Check every adapter against the pipeline's denoiser network, then load the ones not
    loaded yet with diffusers' `load_lora_weights` (the pipeline's own LoRA loader mixin;
    nothing is loaded if any check fails). SuperDiff's adapters are its own: an adapter the
    user loaded is never deleted or replaced (a name the user holds gets a fresh one, in
    `spec.loaded_as`), and the cache `pipe._superdiff_adapters` counts an adapter as loaded only
    while the network still holds that very adapter (not after `unload_lora_weights` or
    `delete_adapters`). Afterwards the user's adapters are active, at their weights, and the
    LoRA layers on or off, as before; SuperDiff's adapters act only in the routed forward."""
    prefix, net = denoiser_of(pipe)
    peft = dict(getattr(net, "peft_config", None) or {})
    cached = getattr(pipe, "_superdiff_adapters", {})
    ours = {n: v for n, v in cached.items() if isinstance(v, tuple) and peft.get(n) is v[1]}
    held = set(peft)  # every adapter name the pipeline holds, in any component
    for names in (pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}).values():
        held.update(names)
    todo, layers, chosen = [], {}, {}
    for spec in specs:
        if spec is None or spec.name == BASE:
            continue
        if spec.key in chosen:  # the same file at the same scale, or a duplicate entry
            spec.loaded_as = chosen[spec.key]
            continue
        state = _lora_keys(pipe, spec)
        check_architecture(pipe, spec, state)
        layers[spec.key] = {_module_path(k, prefix) for k in _network_state(state, prefix)}
        name = _network_name(spec.key, ours, held, set(chosen.values()))
        chosen[spec.key] = spec.loaded_as = name
        if ours.get(name, ("",))[0] != spec.sha256:
            todo.append(spec)
    if not todo:
        pipe._superdiff_adapters = ours
        return
    before = _LayerState.of(net)
    try:
        _load(pipe, net, todo, layers, ours)
    finally:  # also after a refused file: the user's adapters as they were, SuperDiff's off
        pipe._superdiff_adapters = ours
        _restore_user_state(net, before)


def _load(pipe: Any, net: torch.nn.Module, todo: Sequence[AdapterSpec], layers: Mapping[str, set],
          ours: dict[str, tuple]) -> None:
    from peft.tuners.lora import LoraLayer

    for spec in todo:
        name = spec.loaded_as
        if ours.pop(name, None) is not None:  # SuperDiff's own adapter under this name, for another file
            pipe.delete_adapters(name)
        pipe.load_lora_weights(str(spec.file.parent), weight_name=spec.file.name, adapter_name=name)
        got = {n for n, m in net.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}
        if got != layers[spec.key]:  # diffusers skips what it cannot map: refuse a partial adapter
            pipe.delete_adapters(name)
            missing = sorted(layers[spec.key] - got)
            raise ValueError(f"adapter {spec.name!r} ({spec.file}): diffusers loaded {len(got)} of its "
                             f"{len(layers[spec.key])} layers (not loaded: {missing[:3]}); the file mixes key "
                             "formats or names layers this network lacks")
        ours[name] = (spec.sha256, net.peft_config[name])


@contextlib.contextmanager
def _only(net: torch.nn.Module, scales: Mapping[str, float]) -> Iterator[None]:
    """LoRA layers switched on with exactly the adapters in `scales` active, adapter `name` at
    scale scales[name] (so a denoiser's own LoRA scale, cross_attention_kwargs /
    joint_attention_kwargs {"scale": s}, multiplies each of them as diffusers multiplies its
    active adapters); every layer's active set, scales and on/off flag restored after."""
    saved = _LayerState.of(net)
    names = list(scales)
    for s in saved:
        s.layer._active_adapter = list(names)
        s.layer._disable_adapters = False
        for name, v in scales.items():
            s.layer.set_scale(name, float(v))
    try:
        yield
    finally:
        for s in saved:
            s.restore()


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
        with _only(net, scales):
            yield
    finally:
        for h in handles:
            h.remove()


def merged_adapters(net: torch.nn.Module, scales: Mapping[str, float]) -> contextlib.AbstractContextManager:
    """Every adapter in `scales` active at once (weight merge: each layer adds
    sum_k s_k B_k A_k x), as diffusers' set_adapters(names, weights)."""
    return _only(net, scales)


@dataclass
class AdapterRouting:
    """How the pipeline network's rows use adapters in one call.

    names: adapter keys indexed by cond["adapter"] (index 0 is BASE); scales: per key.
    mode: "rows" (each row its own adapter), "merge" (all adapters summed) or "switch"
    (one adapter for all rows: cycle[(step // switch_every) mod len(cycle)], the step counted
    along `grid`). specs: the adapters, whose `loaded_as` names them in the network.
    """

    names: list[str] = field(default_factory=lambda: [BASE])
    scales: dict[str, float] = field(default_factory=dict)
    mode: str = "rows"
    switch_every: int = 1
    grid: torch.Tensor | None = None
    specs: list[AdapterSpec] = field(default_factory=list)
    cycle: list[str] = field(default_factory=list)
    #: the sampler step being computed (ExpertSet.begin_step, through adapter_forward); None outside one
    step: int | None = None

    def index(self, name: str | None) -> int:
        return self.names.index(name or BASE)

    def switch_adapter(self, t: torch.Tensor) -> str:
        """LoRA Switch: the adapter of the sampler step being computed (`step`: every evaluation
        of a step, Heun's second and a corrector's moves after it included); outside a sampling
        call, of the step whose grid time is nearest to t."""
        step = self.step
        if step is None:
            step = int(torch.argmin((self.grid.to(torch.float64) - float(t)).abs())) if self.grid is not None else 0
        adapters = self.cycle or self.names[1:]
        return adapters[(step // self.switch_every) % len(adapters)]

    def context(self, net: torch.nn.Module, rows: torch.Tensor | None, t: torch.Tensor, n: int):
        loaded = {s.key: s.loaded_as or s.key for s in self.specs}
        scales = {loaded.get(k, k): s for k, s in self.scales.items()}
        if self.mode == "merge":
            return merged_adapters(net, scales)
        if self.mode == "switch":
            k = self.switch_adapter(t)
            return mixed_adapter_batch(net, [loaded.get(k, k)] * n, scales)
        return mixed_adapter_batch(net, [loaded.get(k, k) for k in (self.names[int(i)] for i in rows.tolist())],
                                   scales)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.specs]


def adapter_forward(fn: Any, net: torch.nn.Module, routing: AdapterRouting) -> Any:
    """Wrap a network fn(x, t, cond) so that each call runs the routed adapters (one forward).
    cond["adapter"] (the rows' adapter indices) stays on the CPU: reading it is no device sync.
    fn's `set_grid` (the time inputs of a sampling grid, computed once) is kept; `begin_step`
    (ExpertSet.begin_step) tells the routing which sampler step is being computed."""

    def routed(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        rows = None
        if isinstance(cond, Mapping) and "adapter" in cond:
            cond = dict(cond)
            rows = cond.pop("adapter")
        with routing.context(net, rows, t, x.shape[0]):
            return fn(x, t, cond)

    def set_grid(times: Any, device: Any = None) -> None:
        routing.step = None  # a new sampling call
        if hasattr(fn, "set_grid"):
            fn.set_grid(times, device)

    def begin_step(step: int) -> None:
        routing.step = step

    routed.set_grid, routed.begin_step = set_grid, begin_step  # type: ignore[attr-defined]
    return routed


def _scaled_key(name: str, scale: float, taken: Mapping[str, Any]) -> str:
    """A routing key for adapter `name` at a second scale: name_x<scale> ("." -> "p", "-" -> "m"
    in the scale only), numbered on when taken."""
    key = base = f"{name}_x" + f"{scale:g}".replace(".", "p").replace("-", "m")
    n = 2
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    return key


def plan_adapters(adapters: Sequence[Any] | Any | None, plans: Sequence[Any], prompts: Sequence[str],
                  negatives: Sequence[str | None], method: str, switch_every: int = 1
                  ) -> tuple[str, list[Any], AdapterRouting | None, list[AdapterSpec | None] | None]:
    """A pipeline call's `adapters` argument checked and planned: (operator name, expert plans,
    routing, specs). None or an empty sequence means no adapters (the plans unchanged, routing
    and specs None), as diffusers treats an empty adapter list."""
    if adapters is None or (isinstance(adapters, (list, tuple)) and len(adapters) == 0):
        if isinstance(method, str) and method.lower() in ADAPTER_METHODS:
            raise ValueError(f"operator {method!r} combines LoRA adapters: give at least two with adapters=[...] "
                             "(got none)")
        return method, list(plans), None, None
    specs = resolve_adapters(adapters)
    method, plans, routing = plan_adapter_experts(specs, plans, prompts, negatives, method, switch_every)
    return method, plans, routing, specs


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
    adapters = [s for s in specs if s is not None and s.name != BASE]
    if method in ("merge", "switch") and len(adapters) != len(specs):
        raise ValueError(f"operator {method!r} combines adapters into one expert: give only adapters "
                         "(no None / base entries)")
    if method in ADAPTER_METHODS and len(adapters) < 2:
        raise ValueError(f"operator {method!r} combines several adapters: give at least two (got "
                         f"{len(adapters)}); for one adapter use operator 'single'")
    routing = AdapterRouting()
    keys: dict[tuple[str, float], str] = {}  # one network adapter per (file, scale): PEFT keeps one scale per name
    for s in adapters:
        if method == "merge":  # one expert, every layer adding sum_k s_k B_k A_k: the same file twice adds up
            s.key = s.name
        else:
            s.key = keys.setdefault((s.name, s.scale), s.name if s.name not in routing.scales else
                                    _scaled_key(s.name, s.scale, routing.scales))
        if method == "switch":
            routing.cycle.append(s.key)
        if s.key in routing.scales:
            if method == "merge":
                routing.scales[s.key] += s.scale
            if method in ("merge", "switch"):
                routing.specs.append(s)  # every entry recorded: the one expert is made of all of them
            continue
        routing.names.append(s.key)
        routing.scales[s.key] = s.scale
        routing.specs.append(s)
    others = [p for p in plans if p.network != 0]
    shared_neg = negatives[0] if len(set(negatives)) == 1 else None
    out: list[Any] = []

    def add(spec: AdapterSpec | None, prompt: str, neg: str | None) -> None:
        base = spec is None or spec.name == BASE
        label = "base" if base else (spec.name if spec.scale == 1 else f"{spec.name}@{spec.scale:g}")
        out.append(ExpertPlan(0, prompt, neg, name=f"{label}: {prompt}", adapter=None if base else spec.key))

    if method in ("merge", "switch"):
        own = {s.prompt for s in adapters}
        if len(own) > 1 or (None in own and len(set(prompts)) > 1):
            raise ValueError(f"operator {method!r} makes one expert: give one prompt (the adapters' own prompts "
                             f"differ: {sorted(map(str, own))})")
        prompt = adapters[0].prompt or prompts[0]
        neg = adapters[0].negative_prompt or shared_neg or negatives[0]
        p = ExpertPlan(0, prompt, neg, name=f"{method}({', '.join(s.name for s in adapters)}): {prompt}")
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
