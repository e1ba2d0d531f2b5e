"""The weight-streaming executor (``offload=stream``): K blocks resident, the rest streamed from pinned host memory.

A component's repeated blocks (FLUX: 19 double + 38 single transformer blocks; T5: its 24 encoder blocks), in
execution order, are split into K resident blocks and the streamed rest. Each streamed block is **packed once**
into one contiguous region of a single host buffer (pinned in place with ``cudaHostRegister``, so there is no
second host copy) and the block's own tensors are rebound as views of that region. The GPU holds a ring of R slots:
each slot is one contiguous buffer plus a *template* module per distinct block layout (double vs single block,
T5's block 0 with its relative-attention bias), whose tensors are views into the slot. A side CUDA stream copies
the next blocks' regions into their slots (one ``cudaMemcpyAsync`` per block) while the current block computes;
events order copy-before-compute and compute-before-slot-reuse, so compute waits only when the link is behind.

What moves is the packed bytes, exactly as they are used when resident: bitsandbytes ``Params4bit`` data with its
``quant_state`` (absmax, code, nested state), ``Int8Params`` data + ``SCB``, torchao and quanto tensor subclasses'
inner tensors (``__tensor_flatten__``), ``GGUFParameter`` bytes (its ``quant_type`` kept), fp8 layerwise-cast weights
(their diffusers hooks are copied with the template), bf16 as is. No subclass is moved with ``.to()`` (bitsandbytes'
``Params4bit.to`` drops ``quant_state.code``, diffusers #10798): every plain inner tensor is copied and the subclass
object rebuilt around the copy, so the kernels see the same bytes, dtypes, shapes and strides as when resident.

Resident blocks: the K largest blocks (ties: first in execution order). Each resident block removes its own bytes
from every step's copy, so per block of VRAM kept resident the largest save the most link time; in FLUX the 19
double blocks are the largest and come first, so "largest first" is also "first K", and the prefetch of the first
streamed block overlaps the resident blocks' compute. The prefetch runs cyclically: after the last streamed block
the copies of the next step's first streamed blocks start at once.

The wrapping is explicit and reversible: each streamed ``ModuleList`` entry is replaced by a ``StreamedBlock`` proxy
(the original block is kept on the proxy, outside the module tree so ``.to()`` never moves it) and ``detach()``
puts the blocks back; templates are registered under ``<component>.stream_templates``, so ``compile=regional``
(``compile_repeated_blocks``) and ``set_attention_backend`` reach them, and their addresses are fixed.

Between stages the ring holds nothing: ``release()`` (the Runner calls it for T5 after encode and for the
transformer after denoise) resizes the slot storages to 0, so the VAE decode has that memory; the next first block
re-allocates them under the same template tensors. The host buffer's page lock is undone by ``detach()`` or, for an
executor dropped without it, by a finalizer on the buffer, so freed memory never stays registered.

The adaLN modulation of the streamed blocks (``MODULATION``) depends only on temb, so eager runs hoist it out of the
per-step copy: each such layer is replaced in its block by a ``HoistedLinear`` stand-in and packed after the blocks
in the same host buffer; at a generation's first step (a forward hook on ``time_text_embed``) the remaining steps'
tembs are predicted from the scheduler's timesteps, each layer is copied once through the ring and run on every
step's temb, and each later step checks its temb against the prediction exactly before the stand-ins serve the
cached outputs (a temb not predicted computes the layers for itself alone).

On CPU the same code runs with CPU slot buffers and synchronous copies (no streams or events): the tests cover the
bookkeeping and the identity of outputs with ``offload=none``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from . import measure
from .errors import RecipeError

ALIGN = 512  # bytes: every tensor region starts aligned for any dtype and for vectorised kernels
BLOCK_ALIGN = 4096  # host regions start on a page
DEFAULT_SLOTS = 2  # double buffering: one block computes while the next is copied (measured enough on the H200)
# which ModuleLists hold a component's repeated blocks, in execution order
COMPILE_FULL_WHY = ("compile=full with offload=stream: the executor issues copies and waits on CUDA events between "
                    "blocks, in Python, so one fullgraph of the whole transformer cannot contain them")
BLOCK_LISTS = {
    "transformer": ("transformer_blocks", "single_transformer_blocks"),
    "text_encoder_2": ("encoder.block",),
}
# adaLN modulation: the linear layers of a block whose input is silu(temb) alone (FLUX: AdaLayerNormZero's and
# AdaLayerNormZeroSingle's ``linear``, 3.23 G of the transformer's 11.9 G parameters, bf16 under fp8 layerwise
# casting). temb depends only on the step's timestep, guidance and pooled text embedding, all known before the first
# step, so a streamed block's modulation is computed for every step at once, its weights copied once per generation
MODULATION = {"transformer": ("norm1.linear", "norm1_context.linear", "norm.linear")}
HOIST_COMPILE_WHY = ("the adaLN modulation is streamed with its block under compile: its stand-in reads the "
                     "executor's cache by block and step, which a compiled region would guard on (one recompile per "
                     "block and step)")


# ----------------------------------------------------------------------------------------------------------
# plain inner tensors of a parameter, buffer or tensor subclass, and rebuilding one around new plain tensors


def _is_wrapper(t) -> bool:
    """torchao / quanto wrapper subclasses: their data lives in inner tensors named by __tensor_flatten__."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _is_state(v) -> bool:
    """bitsandbytes QuantState (absmax/code/offset/state2) or MatmulLtState (CB/SCB): objects holding tensors."""
    name = type(v).__name__
    return name in ("QuantState", "MatmulLtState")


def _state_items(st):
    return [(k, v) for k, v in sorted(vars(st).items()) if isinstance(v, torch.Tensor) or _is_state(v)]


def _walk(t, out: list, meta: list, path: str) -> None:
    """Append ``t``'s plain tensors to ``out`` in a fixed order, and its non-tensor layout facts to ``meta``."""
    if _is_state(t):
        meta.append((path, type(t).__name__,
                     tuple((k, repr(v)) for k, v in sorted(vars(t).items())
                           if not isinstance(v, torch.Tensor) and not _is_state(v))))
        for k, v in _state_items(t):
            _walk(v, out, meta, f"{path}.{k}")
        return
    if _is_wrapper(t):
        names, ctx = t.__tensor_flatten__()
        meta.append((path, type(t).__name__, tuple(names), repr(ctx), tuple(t.shape), tuple(t.stride())))
        for n in names:
            _walk(getattr(t, n), out, meta, f"{path}.{n}")
        return
    out.append((path, t))
    extra = getattr(t, "__dict__", None)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and extra:
        # Parameter subclasses holding their data directly (Params4bit, Int8Params, GGUFParameter): their
        # attributes (quant_state, SCB/CB, quant_type) go with them
        meta.append((path, type(t).__name__,
                     tuple((k, repr(v)) for k, v in sorted(extra.items())
                           if not isinstance(v, (torch.Tensor, torch.nn.Module)) and not _is_state(v))))
        for k, v in sorted(extra.items()):
            if isinstance(v, torch.Tensor) or _is_state(v):
                _walk(v, out, meta, f"{path}.{k}")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor sharing its storage (no subclass method runs on it)."""
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def _rebuild(t, new_plain, objmap: dict):
    """A new object of ``t``'s type whose plain tensors are ``new_plain(old_plain)``; bitsandbytes state objects are
    copied once per block (``objmap``), so a weight and its module keep sharing one state. ``objmap`` maps id(old) to
    (old, new): it keeps the old object alive and is checked by identity, so an id reused by a new object after the
    old one is freed (a module's tensors are replaced one by one) can never return another object's copy."""
    hit = objmap.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    if _is_state(t):
        new = copy.copy(t)
        objmap[id(t)] = (t, new)
        for k, v in _state_items(t):
            setattr(new, k, _rebuild(v, new_plain, objmap))
        return new
    if _is_wrapper(t):
        names, ctx = t.__tensor_flatten__()
        inner = {n: _rebuild(getattr(t, n), new_plain, objmap) for n in names}
        new = type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=False)
    else:
        data = new_plain(t)
        if type(t) is torch.Tensor:
            new = data
        elif type(t) is torch.nn.Parameter:
            new = torch.nn.Parameter(data, requires_grad=False)
        else:  # Params4bit, Int8Params, GGUFParameter: same class around the new data, attributes carried over
            new = torch.Tensor._make_subclass(type(t), data, False)
            for k, v in vars(t).items():
                if isinstance(v, torch.Tensor) or _is_state(v):
                    v = _rebuild(v, new_plain, objmap)
                setattr(new, k, v)
    objmap[id(t)] = (t, new)
    return new


def _owned_tensors(module: torch.nn.Module):
    """(kind, name, value) for the tensors a module holds directly: parameters, buffers, and plain attributes that
    are tensors or bitsandbytes states (Linear8bitLt.state holds CB/SCB after its first forward)."""
    for n, p in module._parameters.items():
        if p is not None:
            yield "param", n, p
    for n, b in module._buffers.items():
        if b is not None:
            yield "buffer", n, b
    for n, v in vars(module).items():
        if n.startswith("_"):
            continue
        if isinstance(v, torch.Tensor) or _is_state(v):
            yield "attr", n, v


def _set_owned(module, kind, name, value) -> None:
    if kind == "param":
        module._parameters[name] = value
    elif kind == "buffer":
        module._buffers[name] = value
    else:
        object.__setattr__(module, name, value)


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class Layout:
    """Where each distinct plain tensor of a block lives in its packed region, and the block's layout signature."""
    regions: list  # (key, offset, dtype, shape, stride, nbytes), one per distinct tensor
    index: dict  # tensor key -> region position
    nbytes: int
    signature: tuple

    def view(self, buf: torch.Tensor, pos: int) -> torch.Tensor:
        _, off, dtype, shape, stride, nbytes = self.regions[pos]
        flat = buf[off:off + nbytes] if nbytes else buf[:0]
        if dtype == torch.uint8:
            return flat.as_strided(shape, stride) if nbytes else flat.new_empty(shape)
        return flat.view(dtype).as_strided(shape, stride) if nbytes else flat.view(dtype).new_empty(shape)


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def block_layout(block: torch.nn.Module) -> Layout:
    regions, index, off = [], {}, 0
    sig = []
    for mname, mod in block.named_modules():
        for kind, name, v in _owned_tensors(mod):
            plain, meta = [], []
            _walk(v, plain, meta, f"{mname}.{name}")
            sig.append((kind, f"{mname}.{name}", type(v).__name__, tuple(meta)))
            for path, t in plain:
                k = _key(t)
                if k not in index:
                    off = _align(off, ALIGN)
                    nb = _span_bytes(t)
                    index[k] = len(regions)
                    regions.append((k, off, t.dtype, tuple(t.shape), tuple(t.stride()), nb))
                    off += nb
                r = regions[index[k]]
                sig.append((path, str(t.dtype), r[3], r[4], r[1]))
    # hooks and forward replacements are part of what a block does (fp8 layerwise casting): same kinds everywhere
    sig.append(tuple(sorted(type(getattr(m, "_diffusers_hook", None)).__name__ for _, m in block.named_modules())))
    return Layout(regions, index, _align(off, ALIGN), tuple(sig))


def _rebind(block: torch.nn.Module, layout: Layout, buf: torch.Tensor, copy_data: bool) -> None:
    """Rebind every tensor of ``block`` (in place) to its view in ``buf``, copying the data first if asked."""
    views: dict = {}

    def new_plain(t):
        pos = layout.index[_key(t)]
        if pos not in views:
            v = layout.view(buf, pos)
            if copy_data and v.numel():
                v.copy_(t)
            views[pos] = v
        return views[pos]

    objmap: dict = {}
    for mod in block.modules():
        for kind, name, v in list(_owned_tensors(mod)):
            _set_owned(mod, kind, name, _rebuild(v, new_plain, objmap))
    _fix_module_refs(block)


def _fix_module_refs(block: torch.nn.Module) -> None:
    # Params4bit keeps a reference to its Linear4bit (fix_4bit_weight_quant_state_from_module)
    for mod in block.modules():
        w = mod._parameters.get("weight")
        if w is not None and isinstance(getattr(w, "module", None), torch.nn.Module):
            w.module = mod


def _template(block: torch.nn.Module, layout: Layout, buf: torch.Tensor) -> torch.nn.Module:
    """A copy of ``block``'s structure (modules, hooks, attention processors) whose tensors are views of ``buf``.
    Tensors are rebuilt, never deep-copied (deepcopy of quanto and GGUF parameters fails, and would copy bytes)."""
    views: dict = {}

    def new_plain(t):
        pos = layout.index[_key(t)]
        if pos not in views:
            views[pos] = layout.view(buf, pos)
        return views[pos]

    objmap: dict = {}
    memo: dict = {}
    for mod in block.modules():
        for kind, name, v in _owned_tensors(mod):
            memo[id(v)] = _rebuild(v, new_plain, objmap)
    for old_id, (_, new) in list(objmap.items()):  # states reached through parameters (objmap keeps them alive)
        memo.setdefault(old_id, new)
    tmpl = copy.deepcopy(block, memo)
    _fix_module_refs(tmpl)
    _rehook(block, tmpl)
    return tmpl


def _rehook(block: torch.nn.Module, tmpl: torch.nn.Module) -> None:
    """diffusers hooks (fp8 layerwise casting) wrap ``forward`` in closures that deepcopy does not copy: the copy's
    forward would still run the original module. Register fresh copies of the same hooks, in order, on the template."""
    for (name, m), (_, t) in zip(block.named_modules(), tmpl.named_modules()):
        reg = getattr(m, "_diffusers_hook", None)
        if reg is None:
            continue
        from diffusers.hooks import HookRegistry

        t.__dict__.pop("forward", None)
        del t._diffusers_hook
        new = HookRegistry.check_if_exists_or_initialize(t)
        for hook_name in reg._hook_order:
            hook = copy.copy(reg.hooks[hook_name])
            if getattr(hook, "_is_stateful", False):
                raise RecipeError(f"offload=stream: {name} carries the stateful diffusers hook {hook_name!r}, which a "
                                  "shared template cannot hold. Alternative: offload=none")
            new.register_hook(hook, hook_name)


def _cpu_pack_bnb4(module: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight at its first eval forward (in place). Do it
    once before packing so host blocks and templates hold the format the kernels use (as a resident module would
    after its first forward); a template would otherwise repack its slot view into a new tensor."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False) and not m.training:
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            fix_4bit_weight_quant_state_from_module(m)
            qs = m.weight.quant_state
            if not getattr(qs, "packing_format_for_cpu", False):
                m.weight.data, _ = _convert_weight_packed_for_cpu(m.weight.data, qs)


def check_bnb4_states(module: torch.nn.Module, where: str) -> None:
    """Every 4-bit weight's quant_state as bitsandbytes builds it: a plain absmax, float32 (uint8 when nested, with a
    float32 state2.absmax), a float32 code. A broken state (a move that gave it another tensor) fails here with its
    name, before any kernel runs on it."""
    for name, m in module.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        qs = getattr(w, "quant_state", None) if w is not None else None
        if qs is None or type(qs).__name__ != "QuantState":
            continue
        nested = bool(getattr(qs, "nested", False))
        want = torch.uint8 if nested else torch.float32
        cpu_packed = getattr(qs, "packing_format_for_cpu", False)  # bitsandbytes' CPU repack keeps absmax in bf16
        bad = []
        if type(qs.absmax) is not torch.Tensor or (qs.absmax.dtype != want and not cpu_packed):
            bad.append(f"absmax is {type(qs.absmax).__name__} {qs.absmax.dtype}, not Tensor {want}")
        if qs.code is None or qs.code.dtype != torch.float32:
            bad.append(f"code is {None if qs.code is None else qs.code.dtype}")
        if nested and (qs.state2 is None or qs.state2.absmax.dtype != torch.float32):
            bad.append("nested state2.absmax is not float32")
        if bad:
            raise RuntimeError(f"offload=stream: {where}.{name}: bitsandbytes 4-bit state broken ({'; '.join(bad)})")


def _to_device(module: torch.nn.Module, device: torch.device, skip: set) -> int:
    """Move every tensor of ``module`` outside the ``skip`` modules to ``device`` by copying plain inner tensors and
    rebuilding the subclasses around them (never ``.to()`` on a subclass). Returns the bytes moved."""
    moved = {}

    def new_plain(t):
        k = _key(t)
        if k not in moved:
            # the plain tensor, never the subclass's own .to(): Params4bit.to moves its quant_state IN PLACE
            # (QuantState.to rebinds absmax/code), which frees the old state tensors mid-walk; their ids are then
            # reused by the new ones, and an id-keyed map would hand a later state another module's weight
            # (CUDA nf4: "absmax must be float32, got torch.uint8")
            moved[k] = t if t.device == device else _plain(t).to(device)
        return moved[k]

    objmap: dict = {}
    stack = [module]
    while stack:
        mod = stack.pop()
        if id(mod) in skip:
            continue
        for kind, name, v in list(_owned_tensors(mod)):
            _set_owned(mod, kind, name, _rebuild(v, new_plain, objmap))
        stack.extend(mod._modules.values() if mod._modules else ())
    _fix_module_refs(module)
    return sum(t.untyped_storage().nbytes() for k, t in moved.items() if k[4] != device)


# ----------------------------------------------------------------------------------------------------------
# page-locking the host buffer in place (cudaHostRegister), undone when the buffer dies even without detach()


@functools.lru_cache(maxsize=1)
def _loaded_cudart():
    """The libcudart this process already loaded (torch's), by path from /proc/self/maps, so ctypes reaches the same
    runtime state (dlopen of a loaded path returns that library). None where there is none to find."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libcudart.so" in ln and "/" in ln}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _clear_cuda_error() -> bool:
    """Reset the thread's last CUDA runtime error after a failed runtime call. torch's ``cudart()`` bindings return
    the error but leave it set, and torch's next kernel-launch check (``cudaGetLastError``) then reports it from an
    unrelated call ("invalid argument" in the next test). ``torch.cuda.cudart()`` has no ``cudaGetLastError``, so it
    is called from the loaded libcudart; returns whether it could be."""
    fn = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if fn is not None:
        fn()
        return True
    lib = _loaded_cudart()
    if lib is None:
        return False
    lib.cudaGetLastError()
    return True


def _cudart_call(name: str, *args) -> int:
    err = int(getattr(torch.cuda.cudart(), name)(*args))
    if err:
        _clear_cuda_error()
    return err


def _unregister(ptr: int) -> None:
    # a finalizer: never raises (it may run from the garbage collector); a failure only clears the error it left
    try:
        _cudart_call("cudaHostUnregister", ptr)
    except Exception:
        pass


def pin_in_place(host: torch.Tensor) -> weakref.finalize:
    """Page-lock ``host`` in place and return the (idempotent) finalizer that unregisters it: called by ``detach()``,
    else run when the tensor is collected. An executor dropped without ``detach()`` (a failed test, a new Runner in
    the same process) used to leave its range registered; once the memory was freed and reused by the next buffer,
    cudaHostRegister failed with 712 (cudaErrorHostMemoryAlreadyRegistered)."""
    ptr, nbytes = host.data_ptr(), host.numel() * host.element_size()
    err = _cudart_call("cudaHostRegister", ptr, nbytes, 0)
    if err:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {err}): cannot pin the streamed blocks' "
                           "host buffer. Alternative: offload=group-leaf or offload=none")
    fin = weakref.finalize(host, _unregister, ptr)
    fin.atexit = False  # at interpreter exit the process's pages go anyway, and the runtime may be gone already
    return fin


# ----------------------------------------------------------------------------------------------------------
# the executor


class StreamedBlock(torch.nn.Module):
    """Stands in a ModuleList for a streamed block: runs it on its slot's template. The original block is kept in
    ``host_block`` (not a submodule: ``.to()``/``state_dict`` of the component do not see it)."""

    def __init__(self, executor: "BlockStream", pos: int, host_block: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "executor", executor)
        object.__setattr__(self, "host_block", host_block)
        self.pos = pos

    def forward(self, *args, **kwargs):
        return self.executor.run(self.pos, args, kwargs)

    def extra_repr(self) -> str:
        return f"pos={self.pos}, streams {type(self.host_block).__name__}"


class HoistedLinear(torch.nn.Module):
    """Stands in a streamed block for its adaLN modulation linear (``MODULATION``): returns the output the executor
    computed for this block and the current step from the same layer's weights (``BlockStream.modulation``). The
    layer itself is held by the executor, packed in the host buffer after the blocks."""

    def __init__(self, executor: "BlockStream", path: str):
        super().__init__()
        object.__setattr__(self, "executor", executor)
        self.path = path

    def forward(self, x):
        return self.executor.modulation(self.path, x)

    def __deepcopy__(self, memo):  # a template's stand-in reads the same executor (deepcopy would copy it)
        return HoistedLinear(self.executor, self.path)

    def extra_repr(self) -> str:
        return f"{self.path}: computed once per generation for every step"


@dataclass
class _Block:
    name: str  # e.g. "transformer_blocks.3"
    parent: torch.nn.ModuleList
    index: int
    module: torch.nn.Module
    layout: Layout


@dataclass
class _Mod:
    pos: int  # the streamed block's position
    path: str  # in the block, e.g. "norm1.linear"
    parent: torch.nn.Module  # the norm module holding it
    attr: str
    module: torch.nn.Module
    layout: Layout = None


@dataclass
class BlockStream:
    """K resident blocks, the rest packed in one pinned host buffer and run through a ring of R device slots."""
    component: str
    root: torch.nn.Module
    device: torch.device
    k: int
    slots: int = DEFAULT_SLOTS
    trace: bool = False
    blocks: list = field(default_factory=list)
    streamed: list = field(default_factory=list)  # _Block, in execution order
    resident: list = field(default_factory=list)
    log: list = field(default_factory=list)  # (pos, slot) per copy issued, when trace
    copies: int = 0
    bytes_copied: int = 0
    hoist: bool = True  # compute streamed blocks' adaLN modulation once per generation (MODULATION)
    timesteps: object = None  # callable -> the scheduler's timesteps (the pipeline's), to predict every step's temb
    mods: list = field(default_factory=list)  # _Mod, hoisted out of the streamed blocks

    # ------------------------------------------------------------------ setup
    def attach(self) -> dict:
        cuda = self.device.type == "cuda"
        if not cuda:
            _cpu_pack_bnb4(self.root)
        self.blocks = _find_blocks(self.root, self.component)
        n = len(self.blocks)
        if not 0 <= self.k <= n:
            raise RecipeError(
                f"offload=stream:{self.k}: the {self.component} has {n} blocks, so at most {n} can be resident. "
                f"Alternative: offload=stream:{n} (all resident) or offload=stream (K from --vram)")
        order = sorted(range(n), key=lambda i: (-self.blocks[i].layout.nbytes, i))
        keep = set(order[:self.k])
        self.resident = [b for i, b in enumerate(self.blocks) if i in keep]
        self.streamed = [b for i, b in enumerate(self.blocks) if i not in keep]
        skip = {id(b.module) for b in self.streamed}
        self._hoist_modulation()
        moved = _to_device(self.root, self.device, skip)  # resident blocks and the non-block parts

        # one host buffer for all streamed blocks, each block's region page-aligned, then the hoisted modulation
        # layers; pinned in place
        parts = self.streamed + self.mods
        offs, total = [], 0
        for b in parts:
            offs.append(total)
            total = _align(total + b.layout.nbytes, BLOCK_ALIGN)
        self.host = torch.empty(total, dtype=torch.uint8)
        self.pinned = False
        self.host_views = []
        for b, off in zip(parts, offs):
            region = self.host[off:off + b.layout.nbytes]
            _rebind(b.module, b.layout, region, copy_data=True)  # the old storages are freed here, block by block
            measure.release_host_heap()  # ...and their heap pages leave RSS now, not sit beside the buffer's
            packed = block_layout(b.module)  # keyed by the new (host view) tensors
            name = b.name if isinstance(b, _Block) else self._mod_name(b)
            if packed.signature != b.layout.signature or packed.nbytes != b.layout.nbytes:
                raise RuntimeError(f"{self.component}.{name}: packing changed the layout")
            b.layout = packed
            self.host_views.append(region)
        self.mod_views = self.host_views[len(self.streamed):]
        del self.host_views[len(self.streamed):]
        if cuda and total:
            # pinned in place after packing: registering commits every page at once, so doing it before the copies
            # would hold the unpacked component and the whole buffer in host memory together
            self._unpin = pin_in_place(self.host)
            self.pinned = self.host.is_pinned()
            if not self.pinned:
                self._unpin()
                raise RuntimeError(f"cudaHostRegister of {total} bytes returned success but the buffer is not pinned. "
                                   "Alternative: offload=group-leaf or offload=none")

        # the ring: R slot buffers on the device, and per slot one template per distinct layout
        self.slots = max(1, min(self.slots, len(self.streamed))) if self.streamed else 0
        slot_bytes = max((b.layout.nbytes for b in parts), default=0)
        self.slot_bufs = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        self.layout_id, self.templates, self.rebind_each_run, self._bindings = self._slot_templates(
            self.streamed, lambda b: b.name)
        (self.mod_layout_id, self.mod_templates, self.mod_rebind,
         self._mod_bindings) = self._slot_templates(self.mods, self._mod_name)
        if self.templates:
            self.root.stream_templates = torch.nn.ModuleList([t for row in self.templates for t in row])
        for pos, b in enumerate(self.streamed):
            b.parent[b.index] = StreamedBlock(self, pos, b.module)

        self.queue: deque = deque()  # (pos, slot) copied or in flight, not yet computed
        self.released = False  # slot storages freed between stages (release / _acquire)
        self.next_slot = 0
        self.slot_holds = [None] * self.slots  # which block's bytes each slot holds (or is receiving)
        if cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(self.slots)]
            self.computed = [torch.cuda.Event() for _ in range(self.slots)]
            self._timing: list = []  # (copy start, copy end, nbytes) of the current pass
            self._compute_timing: list = []  # (start, end) of each streamed block's compute
            self.measured: dict = {}
        return self.describe(moved)

    def _hoist_modulation(self) -> None:
        """Take each streamed block's modulation layers out of it (``HoistedLinear`` in their place), so the block's
        layout and per-step copy no longer hold them; hook ``time_text_embed`` to learn each step's temb."""
        self.mods, self.mod_index = [], {}
        self.mod_out, self.mod_tembs, self.mod_step, self.mod_next = [], [], None, 0
        self.mod_stats = {"precomputes": 0, "steps_computed": 0, "hits": 0, "unpredicted": 0, "bytes_copied": 0}
        self._predicting = False
        self._temb_hook = None
        paths = MODULATION.get(self.component, ())
        if not (self.hoist and paths and self.streamed and hasattr(self.root, "time_text_embed")):
            self.hoist = False
            return
        for pos, b in enumerate(self.streamed):
            for path in paths:
                parent_name, _, attr = path.rpartition(".")
                try:
                    parent = b.module.get_submodule(parent_name)
                except AttributeError:
                    continue
                lin = getattr(parent, attr, None)
                if not isinstance(lin, torch.nn.Module) or isinstance(lin, HoistedLinear):
                    continue
                self.mod_index[(pos, path)] = len(self.mods)
                self.mods.append(_Mod(pos, path, parent, attr, lin, block_layout(lin)))
                setattr(parent, attr, HoistedLinear(self, path))
            b.layout = block_layout(b.module)
        if not self.mods:
            self.hoist = False
            return
        self._temb_hook = self.root.time_text_embed.register_forward_hook(self._on_temb, with_kwargs=True)

    def _mod_name(self, m: "_Mod") -> str:
        return f"{self.streamed[m.pos].name}.{m.path}"

    def _slot_templates(self, parts: list, name_of) -> tuple:
        """For ``parts`` (streamed blocks, or hoisted modulation layers) run from the slots: (each part's layout id,
        per slot one template per distinct layout, whether diffusers hooks re-cast weights so the templates are
        rebound around every run, the templates' bindings)."""
        layouts = {}
        for b in parts:
            layouts.setdefault(b.layout.signature, b)
        layout_id = [list(layouts).index(b.layout.signature) for b in parts]
        templates = [[_template(rep.module, rep.layout, buf) for rep in layouts.values()]
                     for buf in self.slot_bufs] if parts else []
        for row in templates:
            for tmpl, rep in zip(row, layouts.values()):
                check_bnb4_states(tmpl, f"{self.component} template of {name_of(rep)}")
        for row in templates:  # a template must be laid out exactly as the parts it runs
            for tmpl, (sig, rep) in zip(row, layouts.items()):
                got = block_layout(tmpl).signature
                if got != sig:
                    diff = next((a, b) for a, b in zip(got, sig) if a != b) if len(got) == len(sig) else "length"
                    raise RecipeError(
                        f"offload=stream: the {self.component} template for {name_of(rep)} is not laid out as the "
                        f"module (first difference: {diff}). Alternative: offload=none or offload=group-leaf")
        # diffusers layerwise casting re-casts weights in its hooks (module.to): rebind before every run
        rebind = any(getattr(m, "_diffusers_hook", None) is not None for t in layouts.values() for m in t.module.modules())
        return layout_id, templates, rebind, [[_bindings(t) for t in row] for row in templates]

    # ------------------------------------------------------------------ the hoisted modulation
    def modulation(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The output of the running block's modulation layer ``path`` at this step (computed by ``_precompute``)."""
        if self.mod_step is None:
            raise RuntimeError(f"{self.component}: a hoisted modulation layer ran before time_text_embed gave the "
                               "step's temb (the executor computes the modulation from it)")
        out = self.mod_out[self.mod_index[(self.cur_pos, path)]][self.mod_step]
        if out.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.component}: modulation computed for batch {out.shape[0]}, called with "
                               f"{x.shape[0]}")
        return out

    def _on_temb(self, module, args, kwargs, temb):
        """Each step: the temb predicted for this step, compared exactly (one host sync), serves the cached
        modulation; anything else (the first step, another schedule or prompt) computes it anew: for the rest of
        the schedule when the pipeline's timesteps predict this temb, else for this temb alone."""
        if self._predicting:
            return
        j = self.mod_next
        if j < len(self.mod_tembs) and self.mod_tembs[j].shape == temb.shape and torch.equal(self.mod_tembs[j], temb):
            self.mod_step, self.mod_next = j, j + 1
            self.mod_stats["hits"] += 1
            return
        tembs = self._predict(module, args, kwargs, temb)
        self._precompute(tembs)
        self.mod_step, self.mod_next = 0, 1

    def _predict(self, module, args, kwargs, temb) -> list:
        """[temb, the next steps' tembs...]: the scheduler's remaining timesteps through the pipeline's and the
        model's own casts (FluxPipeline: ``t.expand(B).to(latents.dtype) / 1000``; the model: ``.to(dtype) *
        1000``), each run through ``time_text_embed`` with this step's other inputs. Kept only if the prediction of
        this step equals it exactly."""
        ts = self.timesteps() if self.timesteps is not None else None
        if ts is None or not len(ts) or not args or not torch.is_tensor(args[0]) or args[0].ndim != 1:
            self.mod_stats["unpredicted"] += 1
            return [temb]
        t0 = args[0]
        with torch.no_grad():
            cands = [(t.to(t0.device).expand(t0.shape[0]).to(t0.dtype) / 1000).to(t0.dtype) * 1000 for t in ts]
            hit = (torch.stack(cands) == t0).all(dim=1).nonzero().flatten().tolist()
            if not hit:
                self.mod_stats["unpredicted"] += 1
                return [temb]
            self._predicting = True
            try:
                out = [module(c, *args[1:], **kwargs) for c in cands[hit[0]:]]
            finally:
                self._predicting = False
        if not torch.equal(out[0], temb):
            self.mod_stats["unpredicted"] += 1
            return [temb]
        out[0] = temb
        return out

    def _precompute(self, tembs: list) -> None:
        """Every hoisted layer's output for each temb: each layer's packed bytes copied once into a ring slot (the
        next layer's copy overlapping this one's compute), then run on the slot's template once per temb, batch
        as in the block (bit-identical to running it there). The ring's slots are overwritten: its prefetch
        restarts at the next block."""
        cuda = self.device.type == "cuda"
        if self.released:
            self._acquire()
        self.queue.clear()
        self.slot_holds = [None] * self.slots
        xs = [torch.nn.functional.silu(t) for t in tembs]
        self.mod_out = [[] for _ in self.mods]
        cur = torch.cuda.current_stream(self.device) if cuda else None

        def issue(i: int) -> None:
            slot = i % self.slots
            src = self.mod_views[i]
            dst = self.slot_bufs[slot][:src.numel()]
            if cuda:
                self.copy_stream.wait_event(self.computed[slot])
                with torch.cuda.stream(self.copy_stream):
                    dst.copy_(src, non_blocking=True)
                    self.copied[slot].record(self.copy_stream)
            else:
                dst.copy_(src)
            self.mod_stats["bytes_copied"] += src.numel()

        if self.mods:
            issue(0)
        with torch.no_grad():
            for i in range(len(self.mods)):
                if self.slots > 1 and i + 1 < len(self.mods):
                    issue(i + 1)
                slot = i % self.slots
                if cuda:
                    cur.wait_event(self.copied[slot])
                binds = self._mod_bindings[slot][self.mod_layout_id[i]]
                tmpl = self.mod_templates[slot][self.mod_layout_id[i]]
                for x in xs:
                    if self.mod_rebind:
                        _restore(binds)
                    self.mod_out[i].append(tmpl(x))
                if self.mod_rebind:
                    _restore(binds)
                if cuda:
                    self.computed[slot].record(cur)
                if self.slots == 1 and i + 1 < len(self.mods):
                    issue(i + 1)
        self.mod_tembs = list(tembs)
        self.mod_stats["precomputes"] += 1
        self.mod_stats["steps_computed"] += len(tembs)

    def _drop_modulation(self) -> None:
        self.mod_out, self.mod_tembs, self.mod_step, self.mod_next = [], [], None, 0

    def describe(self, moved_bytes: int = 0) -> dict:
        return {
            "blocks": len(self.blocks), "k": len(self.resident), "slots": self.slots,
            "resident": [b.name for b in self.resident],
            "streamed": len(self.streamed),
            "layouts": len(self.templates[0]) if self.templates else 0,
            "bytes_streamed_per_pass": sum(b.layout.nbytes for b in self.streamed),
            "resident_block_bytes": sum(b.layout.nbytes for b in self.resident),
            "slot_bytes": sum(int(s.numel()) for s in self.slot_bufs),
            "pinned_host_bytes": int(self.host.numel()), "pinned": self.pinned,
            "moved_to_device_bytes": moved_bytes,
            "modulation": ({"hoisted_layers": len(self.mods), "bytes_per_generation": sum(m.layout.nbytes for m in self.mods),
                            "how": "the streamed blocks' adaLN modulation layers, out of the per-step copy: copied "
                                   "once per generation and run for every step's temb (predicted from the "
                                   "scheduler's timesteps, each step checked exactly)"}
                           if self.hoist else {"hoisted_layers": 0}),
        }

    def detach(self) -> None:
        """Put the original blocks back in their ModuleLists (their tensors stay in host memory) and drop the ring."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for b in self.streamed:
            b.parent[b.index] = b.module
        for m in self.mods:  # the modulation layers go back into their blocks (their tensors stay host views)
            setattr(m.parent, m.attr, m.module)
        if self._temb_hook is not None:
            self._temb_hook.remove()
            self._temb_hook = None
        self._drop_modulation()
        self.mods, self.mod_templates = [], []
        if hasattr(self.root, "stream_templates"):
            del self.root.stream_templates
        if self.pinned:  # the blocks keep their host views; only the page lock goes (once: the finalizer is spent)
            self._unpin()
            self.pinned = False
        self.templates, self.slot_bufs, self.queue = [], [], deque()
        self.released = False

    def release(self) -> int:
        """Free the ring's device memory after the component's stage (T5 after encode, the transformer after denoise),
        so the next stage (VAE decode) has it; returns the bytes freed. Each slot buffer's storage is resized to 0:
        the templates' tensors are views of that storage, so they stay the same objects (same modules, hooks and
        compiled regions) and hold nothing. The next first block re-allocates the storages (``_acquire``); addresses
        are stable within a stage, and may change between stages (dynamo does not guard on data_ptr; CUDA graphs,
        which would, are refused with offload=stream)."""
        if self.released or not self.slot_bufs:
            return 0
        if self.device.type == "cuda":
            # the cyclic prefetch leaves copies in flight on the copy stream: the free is ordered on the current
            # stream (the buffers' allocation stream), so that stream first waits for them
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        freed = 0
        for buf in self.slot_bufs:
            st = buf.untyped_storage()
            freed += st.nbytes()
            st.resize_(0)
        self.queue.clear()
        self.slot_holds = [None] * self.slots  # the bytes are gone: every slot is copied again
        self._drop_modulation()  # the stage is over: the modulation of its steps too
        self.released = True
        return freed

    def _acquire(self) -> None:
        for buf in self.slot_bufs:
            buf.untyped_storage().resize_(buf.numel() * buf.element_size())
        if self.device.type == "cuda":
            # the new memory may have been in use by work still queued on the current stream (the allocator's reuse
            # is safe on that stream only): copies into it start after that work
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.released = False

    # ------------------------------------------------------------------ running
    def run(self, pos: int, args, kwargs):
        if self.released:
            self._acquire()
        if not self.queue or self.queue[0][0] != pos:
            # first call, or the caller skipped or reordered blocks (a step cache): start the ring at this block.
            # Copies still in flight land in their slots before any later copy there (one copy stream, in order)
            self.queue.clear()
            self._issue(pos)
        self._fill()
        _, slot = self.queue[0]
        cuda = self.device.type == "cuda"
        if cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(self.copied[slot])
            c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0.record(cur)  # after the wait: compute time excludes time spent waiting for the copy
        if self.rebind_each_run:
            _restore(self._bindings[slot][self.layout_id[pos]])
        self.cur_pos = pos
        out = self.templates[slot][self.layout_id[pos]](*args, **kwargs)
        if self.rebind_each_run:
            # and after: the hooks' post-forward cast left each weight in a new tensor outside the slot, which would
            # stay allocated until this template's next run, one block's weights per template (H200, 2026-12-02:
            # fp8-layerwise streamed at K=0 ran out of memory under a 3 GB cap with 2.75 GB allocated, against a
            # predicted 2.16)
            _restore(self._bindings[slot][self.layout_id[pos]])
        if cuda:
            c1.record(cur)
            self.computed[slot].record(cur)
            self._compute_timing.append((c0, c1))
        self.queue.popleft()
        self._fill(after=pos)
        if cuda and pos == len(self.streamed) - 1:
            self._close_pass()
        return out

    def _fill(self, after: int | None = None) -> None:
        """Top the ring up with the blocks after the last one queued (or after ``after``, the block just computed,
        when the queue ran empty: one slot, as with a single streamed block at K = blocks - 1)."""
        while len(self.queue) < self.slots:
            last = self.queue[-1][0] if self.queue else after
            self._issue((last + 1) % len(self.streamed))

    def _issue(self, pos: int) -> None:
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.slots
        src = self.host_views[pos]
        dst = self.slot_bufs[slot][:src.numel()]
        if self.slot_holds[slot] == pos:  # still there (as many blocks as slots): nothing to copy
            self.queue.append((pos, slot))
            return
        self.slot_holds[slot] = pos
        if self.device.type == "cuda":
            cs = self.copy_stream
            cs.wait_event(self.computed[slot])  # the slot's previous block has finished computing
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(cs):
                start.record(cs)
                dst.copy_(src, non_blocking=True)
                end.record(cs)
                self.copied[slot].record(cs)
            self._timing.append((start, end, src.numel()))
        else:
            dst.copy_(src)
        self.queue.append((pos, slot))
        self.copies += 1
        self.bytes_copied += src.numel()
        if self.trace:
            self.log.append((pos, slot))

    def _close_pass(self, final: bool = False) -> None:
        """Harvest the copy and compute events that have completed (no host sync). At a pass's end they open a new
        window (about one pass of copies: the ring's prefetch means some land in the next window); ``stats()``, after
        a sync, adds the rest (``final``). ``measured`` counts the copies it timed as ``timed_copies``: ``copies``
        stays the executor's count of every copy issued (a pass-window count under that key read 3 for 2x3+2)."""
        done, self._timing = _split_done(self._timing, 1)
        cdone, self._compute_timing = _split_done(self._compute_timing, 1)
        if done and not final:
            self._window = [0, 0.0, 0, 0, 0.0]
        w = getattr(self, "_window", None)
        if w is None:
            w = self._window = [0, 0.0, 0, 0, 0.0]
        w[0] += len(done)
        w[1] += sum(s.elapsed_time(e) for s, e, _ in done)
        w[2] += sum(n for _, _, n in done)
        w[3] += len(cdone)
        w[4] += sum(s.elapsed_time(e) for s, e in cdone)
        if w[0]:
            self.measured = {"timed_copies": w[0], "copy_s": round(w[1] / 1e3, 5),
                             "link_gb_s": round(w[2] / (w[1] / 1e3) / 1e9, 2) if w[1] > 0 else None}
            if w[3]:  # the streamed blocks' compute over the same window: copies hide when copy_s <= compute_s
                self.measured["streamed_blocks_compute_s"] = round(w[4] / 1e3, 5)
                self.measured["timed_computes"] = w[3]

    def stats(self) -> dict:
        """``copies``/``bytes_copied``: every copy issued since attach (each pass's, and the ring's prefetch after
        the last block). On CUDA also the timed window of the last pass (``timed_copies``, ``copy_s``, ``link_gb_s``,
        ``streamed_blocks_compute_s``); synchronizes."""
        out = {"copies": self.copies, "bytes_copied": self.bytes_copied}
        if self.hoist:
            out["modulation"] = dict(self.mod_stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._close_pass(final=True)
            out.update(self.measured)
        return out


def _split_done(timing: list, end: int) -> tuple[list, list]:
    """(completed, pending) by each entry's end event, each event queried once (none is lost between two queries)."""
    done, pending = [], []
    for t in timing:
        (done if t[end].query() else pending).append(t)
    return done, pending


def _bindings(tmpl: torch.nn.Module) -> list:
    return [(p, p.data) for m in tmpl.modules() for p in m._parameters.values()
            if p is not None and not _is_wrapper(p)]


def _restore(bindings) -> None:
    for p, view in bindings:
        if p.data_ptr() != view.data_ptr() or p.dtype != view.dtype:
            p.data = view


def _find_blocks(root: torch.nn.Module, component: str) -> list:
    names = BLOCK_LISTS.get(component)
    if names is None:
        raise RecipeError(f"offload=stream streams the transformer and text_encoder_2 blocks, not {component}. "
                          "Alternative: keep it resident")
    out = []
    for lname in names:
        parent = root.get_submodule(lname)
        if not isinstance(parent, torch.nn.ModuleList):
            raise RecipeError(f"{component}.{lname} is not a ModuleList: cannot stream its blocks")
        for i, m in enumerate(parent):
            if isinstance(m, StreamedBlock):
                raise RecipeError(f"{component} is already streamed")
            out.append(_Block(f"{lname}.{i}", parent, i, m, block_layout(m)))
    return out


def attach(root: torch.nn.Module, component: str, device, k: int, slots: int = DEFAULT_SLOTS,
           trace: bool = False, hoist: bool = True, timesteps=None) -> BlockStream:
    """The executor for ``root``'s blocks. Its ring holds no device memory yet: it is allocated at the first streamed
    block and freed after the stage (``release``), so no ring sits beside another stage's (H200, bf16 stream:0: the
    transformer's 1.36 GB ring allocated at attach sat beside T5's during encode and set the 3.23 GB peak)."""
    ex = BlockStream(component, root, torch.device(device), k, slots, trace, hoist=hoist, timesteps=timesteps)
    ex.info = ex.attach()
    ex.release()
    root._vramfit_stream = ex
    return ex


# ----------------------------------------------------------------------------------------------------------
# the recipe step: where components load, K, and the manifest entry


# families whose quantizers run on the device (bitsandbytes and torchao kernels; quanto picks its packed layout by
# device): quantized there, block by block, so the bytes match a resident run's exactly
DEVICE_QUANTIZED = ("bnb", "torchao", "quanto")


# T5 from a checkpoint under offload=stream: the block-by-block quantizer gives the layers quantize-on-load gives for
# these families (memory equal to 0.1 % on the H200, 2026-12-01); transformers' TorchAoConfig also quantizes T5's
# `wo`, which the in-memory quantizer keeps in bf16 (1.0-1.5 GB apart), so torchao T5 keeps quantize-on-load
BLOCKWISE_FROM_HOST = {"transformer": ("bnb", "torchao", "quanto"), "text_encoder_2": ("bnb", "quanto")}


def blockwise_from_host(value: str, component: str) -> bool:
    """True when a checkpoint's component is loaded in bf16 into host memory and quantized one block at a time on
    the device under offload=stream (never whole on the GPU), rather than quantized on load and then parked."""
    from . import quant
    from .recipe import PRECISIONS

    if value in PRECISIONS or component not in BLOCKWISE_FROM_HOST:
        return False
    return quant.get_spec(value).family in BLOCKWISE_FROM_HOST[component]


def load_device(value: str, device, component: str) -> torch.device:
    """Where a component loads under ``offload=stream``. CLIP and the VAE are small (0.25 + 0.17 GB in bf16):
    resident, on the device. The streamed components (transformer, T5): bf16, fp8 layerwise casting (an exact cast,
    which the random stand-in gets block by block as it is drawn: ``StreamedQuantizer``) and GGUF (file bytes) in
    host memory; bitsandbytes, torchao and quanto on the device, where ``quantize_streamed`` quantizes one block at a
    time and moves it to host memory right after, so the whole component never sits on the GPU and the bytes are
    those of a resident run."""
    device = torch.device(device)
    if component not in BLOCK_LISTS or device.type == "cpu":
        return device
    from .recipe import PRECISIONS

    if value in PRECISIONS:
        return torch.device("cpu")
    from . import quant

    spec = quant.get_spec(value)
    return device if spec.needs_cuda or spec.family in DEVICE_QUANTIZED else torch.device("cpu")


class _One(torch.nn.Module):
    """Holds one block as ``b.0`` so the component's quantizer runs on it alone, with the component's skip list. In a
    ModuleList, as in the component: quanto quantizes per element of the outermost ModuleLists (a block), and the
    block's own inner ModuleLists (attn.to_out, ff.net) must not become units."""

    def __init__(self, block: torch.nn.Module, skip: list):
        super().__init__()
        self.b = torch.nn.ModuleList([block])
        self._keep_in_fp32_modules = skip


def _block_skip(skip: list, path: str) -> list:
    out = []
    for k in skip:
        if path == k or path.startswith(k + "."):
            out.append("b.0")  # the whole block is left unquantized
        elif k.startswith(path + "."):
            out.append("b.0." + k[len(path) + 1:])
        else:
            out.append(k)  # suffix keys ("wo") match inside the block as they do in the component
    return out


def park_blocks(module: torch.nn.Module, component: str) -> int:
    """Move a loaded component's streamed blocks to host memory (packed bytes as they are), leaving the rest where
    it is: what ``quantize_streamed`` leaves, for a component that quantize-on-load brought whole onto the GPU.
    Called right after that component loads, so the next one does not load beside it. Returns the bytes moved."""
    host = torch.device("cpu")
    moved = 0
    for lname in BLOCK_LISTS[component]:
        for i, block in enumerate(module.get_submodule(lname)):
            moved += _to_device(block, host, set())
            check_bnb4_states(block, f"{component}.{lname}.{i}")
    return moved


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (same classes, names, configs) whose parameters and buffers are meta tensors of the same
    shapes and dtypes: no bytes are copied, whether ``module`` is still on meta or already drawn."""
    memo: dict = {}
    for mod in module.modules():
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and id(t) not in memo:
                e = torch.empty_like(t, device="meta")
                memo[id(t)] = torch.nn.Parameter(e, requires_grad=False) if isinstance(t, torch.nn.Parameter) else e
    return copy.deepcopy(module, memo)


def layerwise_hooks(module: torch.nn.Module) -> dict:
    """{module name: its diffusers ``LayerwiseCastingHook``} for the modules fp8 layerwise casting hooked."""
    out = {}
    for name, m in module.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        hook = reg.get_hook("layerwise_casting") if reg is not None else None
        if hook is not None:
            out[name] = hook
    return out


def layerwise_plan(module: torch.nn.Module, component: str, value: str, fuse: bool = False) -> dict:
    """The modules ``quant.quantize_component(module, component, value)`` casts (fp8 layerwise casting), each with
    the hook diffusers installs on it: that very call run on a meta copy of ``module`` (fused first for
    ``fuse_qkv=on``, as the block-by-block build fuses each block before casting it), as ``plan.weights.layout``
    does, so the layers and skip patterns (the model's ``_skip_layerwise_casting_patterns`` and keep-in-fp32
    modules, ``quant.layerwise_skip_patterns`` on T5) are diffusers' own, not a copy of its rules."""
    from . import quant

    probe = _meta_copy(module)
    if fuse:
        from . import runtime

        runtime.fuse_qkv_in(probe)
    quant._layerwise(probe, component, value, torch.device("meta"), torch.bfloat16)
    return layerwise_hooks(probe)


class StreamedQuantizer:
    """``quant.quantize_component`` one block at a time on ``device``, each block moved to host memory right after
    (``block_done``); then the rest of the component, blocks set aside, on the device (``finish``). Each linear is
    quantized by the same library call as in a resident run, so the bytes are identical; the device holds at most
    one unquantized block. ``block_done`` may be called while the component is still being built (the random
    stand-in, ``models.materialize_random(unit_done=...)``): the host then never holds more than one bf16 block.

    fp8 layerwise casting (family ``layerwise``) is an exact per-tensor cast and needs no device: each block's
    layers that the casting casts (``layerwise_plan``) are cast where the block is (host memory with ``park``), by
    the hook's own ``initialize_hook`` (``module.to(dtype=storage)``), and the block's bf16 storage is freed; then
    ``finish`` runs the real casting on the whole component, which finds those layers in their storage dtype already
    (a no-op: checked, no tensor of a block is copied) and installs the hooks itself. Drawn whole first, the
    fp8-layerwise stand-in held the bf16 transformer (23.8 GB) beside the cast T5 (5.9 GB): host RSS peaked at
    30.8 GB on the H200 against 20.7 GB pinned after load."""

    def __init__(self, module: torch.nn.Module, component: str, value: str, device, park: bool = True,
                 fuse: bool = False):
        from . import quant

        self.module, self.component, self.value = module, component, value
        self.device = torch.device(device)
        # park=False: each quantized block stays on the device (a resident stand-in drawn there block by block:
        # neither its bf16 weights nor their quantized bytes cross the host link). fuse: fuse_qkv=on, each block's
        # q/k/v fused before it is quantized (flux-fast's order, as runtime.fuse_qkv on the whole transformer)
        self.park, self.fuse = park, fuse
        self.fused = [0, 0, 0]  # attention modules, fused, layers dropped
        if fuse:
            from . import runtime

            runtime.check_fusable(module)
        self.skip = quant._not_convert_keys(module)
        self.blocks = [f"{lname}.{i}" for lname in BLOCK_LISTS[component]
                       for i in range(len(module.get_submodule(lname)))]
        self.done: set = set()
        self.layerwise = quant.get_spec(value).family == "layerwise"
        # layerwise: {module name: hook} of the layers the casting casts, and their storage dtype
        self.cast = layerwise_plan(module, component, value, fuse) if self.layerwise else {}
        storages = {h.storage_dtype for h in self.cast.values()}
        if len(storages) > 1:
            raise RuntimeError(f"{component}={value}: layerwise casting with several storage dtypes {storages}")
        self.storage = next(iter(storages), None)

    def block_done(self, name: str) -> None:
        from . import quant

        block = self.module.get_submodule(name)
        if self.fuse:
            from . import runtime

            self.fused = [a + b for a, b in zip(self.fused, runtime.fuse_qkv_in(block))]
        if self.layerwise:
            self._cast_block(name, block)
            self.done.add(name)
            return
        quant.quantize_component(_One(block, _block_skip(self.skip, name)), self.component, self.value, self.device)
        if self.park:
            _to_device(block, torch.device("cpu"), set())  # packed bytes leave the device before the next block
            measure.release_host_heap()  # the block's freed bf16 weights: their heap pages back to the OS
        check_bnb4_states(block, f"{self.component}.{name}")
        self.done.add(name)

    def _cast_block(self, name: str, block: torch.nn.Module) -> None:
        """fp8 layerwise casting of one block where it is (no device round trip: a cast needs none): each layer the
        whole casting casts, cast by its hook's ``initialize_hook`` (``module.to(dtype=storage)``, diffusers' own
        call when it registers the hook), in place: the bf16 storage is freed. The hooks themselves come in
        ``finish``, from diffusers."""
        for full, hook in self.cast.items():
            if full == name or full.startswith(name + "."):
                hook.initialize_hook(block.get_submodule(full[len(name) + 1:]))
        if self.park:
            measure.release_host_heap()  # the block's freed bf16 weights: their heap pages back to the OS

    def record_fusion(self, manifest) -> None:
        """The fuse_qkv entry of a block-by-block fusion (``fuse=True``), once every block is done."""
        from . import runtime

        runtime.fuse_qkv_entry(manifest, *self.fused, api=(
            "attn.fuse_projections() on each attention module (what transformer.fuse_qkv_projections() calls), "
            "block by block before each block is quantized, the unfused q/k/v layers dropped"))

    @contextlib.contextmanager
    def _blocks_set_aside(self):
        """The component with each block replaced by an empty module, the blocks put back after."""
        lists = [self.module.get_submodule(n) for n in BLOCK_LISTS[self.component]]
        saved = [list(lst) for lst in lists]
        for lst in lists:
            for i in range(len(lst)):
                lst[i] = torch.nn.Module()
        try:
            yield
        finally:
            for lst, blocks in zip(lists, saved):
                for i, block in enumerate(blocks):
                    lst[i] = block

    def finish(self) -> dict:
        from . import quant

        for name in self.blocks:
            if name not in self.done:
                self.block_done(name)
        if self.layerwise:
            return self._finish_layerwise()
        with self._blocks_set_aside():  # the rest: quantized and placed by the component's own call
            entry = quant.quantize_component(self.module, self.component, self.value, self.device)
        how = ("then moved to host ({} blocks, vramfit.stream.quantize_streamed)" if self.park else
               "kept there ({} blocks, vramfit.stream.StreamedQuantizer(park=False))").format(len(self.blocks))
        entry["api"] = f"{entry['api']}; per block on {self.device} {how}, then the rest on {self.device}"
        entry["classes"] = quant.quantized_classes(self.module)
        entry["quantized_modules"] = sum(entry["classes"].values())
        entry["weight_bytes"] = quant.weight_bytes(self.module)
        return entry

    def _finish_layerwise(self) -> dict:
        """The real casting on the whole component, where the blocks are (host memory with ``park``): the blocks'
        layers are in their storage dtype already, so it only installs diffusers' hooks there (and casts the
        non-block layers); checked against ``layerwise_plan``, so a block never keeps a layer cast that diffusers
        would not hook, or misses one it hooks. The non-block layers then go to the device, the blocks set aside."""
        from . import quant

        where = torch.device("cpu") if self.park else self.device
        blocks = [self.module.get_submodule(n) for n in self.blocks]
        before = [(p, p.data_ptr()) for b in blocks for p in b.parameters()]
        entry = quant.quantize_component(self.module, self.component, self.value, where)
        hooked = layerwise_hooks(self.module)
        if set(hooked) != set(self.cast):
            raise RuntimeError(
                f"{self.component}={self.value}: the block-by-block cast does not match diffusers' layerwise casting "
                f"(cast, not hooked: {sorted(set(self.cast) - set(hooked))[:5]}; hooked, not cast: "
                f"{sorted(set(hooked) - set(self.cast))[:5]})")
        copied = [p for p, ptr in before if p.data_ptr() != ptr]
        if copied:
            raise RuntimeError(f"{self.component}={self.value}: the whole-component casting copied {len(copied)} "
                               "block tensors the block-by-block cast had already cast")
        if self.device != where:
            with self._blocks_set_aside():  # the blocks stay where they were cast
                self.module.to(self.device)
        storage = str(self.storage).removeprefix("torch.")
        entry["api"] = (f"{entry['api']}; block by block: each block's cast layers cast to {storage} "
                        + ("in host memory" if self.park else f"on {where}")
                        + f" as soon as the block was drawn ({len(self.blocks)} blocks, "
                          "vramfit.stream.StreamedQuantizer, by each hook's initialize_hook), then this call on the "
                          "whole component (a no-op on those layers: the hooks and skip patterns are diffusers' own)"
                        + (f", then the rest on {self.device}" if self.device != where else ""))
        return entry


def quantize_streamed(module: torch.nn.Module, component: str, value: str, device) -> dict:
    """A built component quantized block by block (``StreamedQuantizer``): see there."""
    return StreamedQuantizer(module, component, value, device).finish()


def resolve_k(recipe, spec=None, shape=None, vram_budget_bytes=None, gpu=None) -> tuple[int, str]:
    """K for this recipe and where it came from: ``stream:K`` as written; plain ``stream`` with a budget from the
    planner's ``plan.stream_k``; without a budget K=0 (every block streamed: the least VRAM)."""
    if recipe.stream_k is not None:
        return recipe.stream_k, "recipe"
    if vram_budget_bytes is None:
        return 0, "no budget: every block streamed"
    from . import plan

    fn = getattr(plan, "stream_k", None)
    if fn is None:  # the planner's K is not in this build yet
        return 0, "planner has no stream_k in this build: every block streamed"
    if isinstance(shape, tuple) and hasattr(plan, "Shape"):  # (height, width[, steps]) -> the planner's Shape
        h, w, *rest = shape
        shape = plan.Shape(h, w, rest[0] if rest else 28, 1, spec.max_sequence_length if spec is not None else 512)
    return int(fn(spec.name if spec is not None else None, recipe, shape, vram_budget_bytes, gpu)), "plan.stream_k"


def resolve(recipe, **kw):
    """The recipe with ``offload=stream:K`` resolved (what a run records)."""
    k, _ = resolve_k(recipe, **kw)
    return recipe.with_(offload=f"stream:{k}")


def hoists(recipe) -> bool:
    """Whether offload=stream computes the streamed blocks' adaLN modulation once per generation: in eager runs
    (under compile it streams with its block: ``HOIST_COMPILE_WHY``)."""
    from .plan.data import compile_scope

    return compile_scope(recipe) == "off"


def pipe_attach_kwargs(pipe, recipe) -> dict:
    """What ``attach`` needs from the pipeline to hoist the modulation: whether the recipe allows it, and the
    scheduler's timesteps, read at each generation's first step from the pipeline's scheduler *then* (the server's
    denoise stage puts a fresh scheduler on the pipe for every batch); a weak reference, so no cycle holds the pipe."""
    ref = weakref.ref(pipe)

    def timesteps():
        p = ref()
        return getattr(getattr(p, "scheduler", None), "timesteps", None)

    return {"hoist": hoists(recipe), "timesteps": timesteps}


def apply_stream(pipe, recipe, device, manifest, k: int | None = None, slots: int = DEFAULT_SLOTS) -> dict:
    """``offload=stream``: stream the transformer's blocks with K resident, and T5's blocks with none resident (it
    runs once per image, so its copy is paid once per image, and it holds no VRAM between images). CLIP and the
    VAE stay resident."""
    device = torch.device(device)
    source = "argument"
    if k is None:
        k, source = resolve_k(recipe)
    comps, executors = {}, {}
    hoist = hoists(recipe)
    for component, kk in (("transformer", k), ("text_encoder_2", 0)):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        ex = attach(module, component, device, kk, slots, **pipe_attach_kwargs(pipe, recipe))
        executors[component] = ex
        comps[component] = ex.info
    for component in ("text_encoder", "vae"):  # resident; loaded on the device already (load_device)
        module = getattr(pipe, component, None)
        if module is not None:
            _to_device(module, device, set())
    proxies = {c: sum(isinstance(m, StreamedBlock) for m in getattr(pipe, c).modules()) for c in executors}
    ok = all(proxies[c] == executors[c].info["streamed"] for c in executors)
    entry = manifest.add(
        "offload", strategy="stream", k=k, k_source=source, recipe_offload=f"stream:{k}", slots=slots,
        rings="allocated at each component's first streamed block, freed after its stage",
        api="vramfit.stream.attach(component, device, k, slots): blocks packed once in pinned host memory "
            "(cudaHostRegister), copied per block on a side CUDA stream into a ring of device slots",
        components=comps, verified=ok,
        bytes_streamed_per_step=comps.get("transformer", {}).get("bytes_streamed_per_pass", 0),
        modulation=(comps.get("transformer", {}).get("modulation") if hoist
                    else {"hoisted_layers": 0, "why": HOIST_COMPILE_WHY}),
        pinned_host_bytes=sum(c["pinned_host_bytes"] for c in comps.values()),
    )
    pipe._vramfit_stream = executors
    if not ok:
        raise RuntimeError(f"offload=stream was requested but the proxies are not installed: {proxies}")
    return entry


def release(pipe, *components: str) -> dict:
    """After a stage: free the slot buffers of these components' executors (all when none named). Bytes freed per
    component; a later call of the component re-allocates them at its first streamed block."""
    executors = getattr(pipe, "_vramfit_stream", {})
    return {c: ex.release() for c, ex in executors.items() if not components or c in components}


def measured(pipe) -> dict:
    """Per component: copies and bytes copied since attach, and on CUDA the last pass's timed window (timed_copies,
    copy_s, link_gb_s; synchronizes)."""
    return {c: ex.stats() for c, ex in getattr(pipe, "_vramfit_stream", {}).items()}
