"""A CUDA device emulated on the CPU, and a model of CUDA-graph capture, so that the suite takes every
`device.type == "cuda"` branch of sphrun without a GPU.

Inside `emulated_cuda()`:
- torch reports one CUDA device (is_available, device_count, current_device; torch.cuda.set_device is
  torch's own, with its index check: only its last C call is stubbed), streams are no-ops and
  `torch.autocast("cuda")` is CPU autocast, so bf16 really computes in bfloat16;
- a tensor created on or moved to `cuda` is a CPU tensor *marked* as on the device, and so is every
  result of an op that reads a marked tensor. Marked tensors say `device == cuda:0` (torch's getter is
  intercepted), so code that follows a tensor's device follows the emulated one;
- what a real GPU refuses or pays for is enforced or counted: an op that mixes a device tensor with a
  host tensor of more than one element raises, as CUDA does (indexing with host indices is a counted
  host-to-device copy instead); reads of device values on the host (.item(), .tolist(), bool(), float(),
  .cpu(), a copy into a host tensor, data-dependent shapes) count as host syncs; host-to-device copies
  count; `.numpy()` of a device tensor raises. A tensor that torch's C++ makes with no tensor argument
  (zeros in a backward formula) takes another tensor's device there, which the CPU does not show: it
  is claimed by the device at its first use with device tensors;
- the emulated device computes with PyTorch's native CPU kernels (oneDNN off: its channels_last
  backward corrupted the heap under this emulation);
- torch.cuda.CUDAGraph is `Graph`, a model of capture: `with torch.cuda.graph(g)` records the aten
  calls that touch the device (host-only work runs once at capture, as on a GPU, and is not replayed),
  with their Python scalars baked in as a graph bakes kernel arguments, and then undoes what they wrote,
  since a real capture runs no kernel. `g.replay()` calls the recording again on the very same tensors,
  each result written into the memory the capture gave it. A random-number op, a host sync or a
  host-to-device copy inside the capture raises, as on a GPU (F.one_hot's bounds check, which runs on
  the CPU only, aside). `g.kernels()` are the recorded ops that launch work (not views, not
  allocations); `g.reset()` drops the recording, and with it the memory the capture gave its results,
  which happens too once sphrun drops the graph (as a real graph's memory pool goes with it), while the
  emulator keeps it, reset, for the tests (`graphs`: every graph made, with its replays);
- device memory is counted: the bytes of live device storages (`allocated`, its `peak`), reported by
  torch.cuda.mem_get_info, memory_allocated and max_memory_allocated out of `total_memory` (80 GiB
  unless a test sets less); an allocation past it raises torch.cuda.OutOfMemoryError, as a GPU does;
- a test injects faults (`faults`): each is called with a Graph at the end of its capture, where it may
  change the recording (a wrong graph) or raise (an invalidated capture: `invalidated_capture`).
"""

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops whose output shape depends on the data: on a GPU their size is read back on the host.
DATA_DEPENDENT_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
# Indexing a device tensor with host indices is allowed: torch copies the indices over first.
HOST_INDEX_OPS = (aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default,
                  aten.index_put.default)
# Ops that launch no kernel though torch does not mark them as views: allocations, and _unsafe_view.
ALLOCATIONS = (aten.empty.memory_format, aten.empty_strided.default, aten._unsafe_view.default)
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")


class EmulationError(RuntimeError):
    """What a GPU would refuse: mixed devices, or a random op, sync or copy inside a graph capture."""


@dataclasses.dataclass
class Counts:
    syncs: int = 0  # reads of device values on the host
    copies_in: int = 0  # host-to-device copies
    ops: int = 0  # aten ops that touched the device

    def since(self, before):
        return Counts(*(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)))


def storage_of(tensor):
    """A tensor's storage, as a Python object that lives as long as the storage does. (Marks hold weak
    references to these: torch's own StorageWeakRef, taken inside a dispatch mode, kept the memory.)"""
    with torch._C.DisableTorchFunction():
        return tensor.untyped_storage()


def tensors_in(value):
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def device_kind(value):
    """'cuda', 'cpu' or None for a device argument (a torch.device or a string)."""
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, str) and value.split(":")[0] in ("cuda", "cpu"):
        return value.split(":")[0]
    return None


def is_device_like(value):
    return device_kind(value) == "cuda"


class Emulator:
    """The state of one emulation: which storages are on the device, the counts, the graphs made."""

    def __init__(self):
        self.marks = {}  # storage address -> weak reference to a storage on the emulated device
        # Storages that C++ made without a tensor argument (zeros in a backward formula, say): they take
        # another tensor's device there, which the CPU does not show; the first device op claims them.
        self.unplaced = {}
        self.counts = Counts()
        self.capturing = None  # the Graph being captured
        self.placement = None  # "device" or "host": where the results of the current call go
        self.excused = 0  # inside F.one_hot: its CPU-only bounds check is not a GPU sync
        self.graphs = []
        self.faults = []  # a test's injected bugs: each called with a Graph once it is captured
        self.total_memory = 80 * 2 ** 30  # bytes: a data-center GPU's, or a test's limit
        self.allocated = self.peak = 0  # bytes of live device storages, and their most since reset

    # --- marks ----------------------------------------------------------------------------------
    def mark(self, tensor, registry=None):
        storage = storage_of(tensor)
        if registry is None and not self.on_device(tensor):
            self.allocate(storage)
        (self.marks if registry is None else registry)[storage._cdata] = weakref.ref(storage)

    # --- memory ----------------------------------------------------------------------------------
    def allocate(self, storage):
        """Count a storage new on the device until it dies; past total_memory, what a GPU raises."""
        size = storage.nbytes()
        if self.allocated + size > self.total_memory:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {size / 2 ** 20:.2f} MiB. GPU 0 has a total capacity of "
                f"{self.total_memory / 2 ** 30:.2f} GiB of which {self.free() / 2 ** 20:.2f} MiB is free.")
        self.allocated += size
        self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self.release, size)

    def release(self, size):
        self.allocated -= size

    def free(self):
        return self.total_memory - self.allocated

    def on_device(self, tensor, registry=None):
        registry = self.marks if registry is None else registry
        if not isinstance(tensor, torch.Tensor):
            return False
        with torch._C.DisableTorchFunction():  # the real device, and no recursion into DevicePlacement
            if tensor.is_meta:
                return False
        storage = storage_of(tensor)
        ref = registry.get(storage._cdata)
        if ref is None:
            return False
        if ref() is not storage:  # a freed storage whose address came back for another tensor
            del registry[storage._cdata]
            return False
        return True

    # --- what a GPU pays for or refuses -----------------------------------------------------------
    def sync(self, what):
        if self.excused:
            return
        if self.capturing is not None:
            raise EmulationError(f"host sync ({what}) inside CUDA graph capture")
        self.counts.syncs += 1

    def copy_in(self, what):
        if self.capturing is not None:
            raise EmulationError(f"host-to-device copy ({what}) inside CUDA graph capture")
        self.counts.copies_in += 1


@contextlib.contextmanager
def placing(emulator, where):
    previous, emulator.placement = emulator.placement, where
    try:
        yield
    finally:
        emulator.placement = previous


class DevicePlacement(TorchFunctionMode):
    """The Python-level half: `cuda` arguments become the CPU with the results marked, marked tensors
    report cuda:0, and host reads of device values are counted."""

    def __init__(self, emulator):
        super().__init__()
        self.emulator = emulator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        em = self.emulator
        if func == torch.Tensor.device.__get__:
            return CUDA if em.on_device(args[0]) else func(*args)
        if func == torch.Tensor.is_cuda.__get__:
            return em.on_device(args[0])
        if func == torch.Tensor.is_cpu.__get__:
            return not em.on_device(args[0]) and func(*args)
        if func is torch.Tensor.get_device:
            return 0 if em.on_device(args[0]) else -1
        if func is F.one_hot:  # its zeros take the input's device inside the C++ op, unseen here
            em.excused += 1
            try:
                with placing(em, "device" if em.on_device(args[0]) else em.placement):
                    return func(*args, **kwargs)
            finally:
                em.excused -= 1
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "numpy" and em.on_device(source):
            raise EmulationError("can't convert a cuda tensor to numpy: copy it to the host first (.cpu())")
        if name in SYNC_METHODS and em.on_device(source):
            em.sync(f"Tensor.{name}")
            with placing(em, "host"):
                if name == "cpu":
                    return source.clone()
                return func(*args, **kwargs)
        if name in ("to", "cuda", "tensor", "as_tensor") or "device" in kwargs:
            return self.place(func, name, source, args, kwargs)
        if not tensors_in((args, kwargs)) and em.placement is None:  # a factory without a device: the host
            with placing(em, "host"):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def place(self, func, name, source, args, kwargs):
        """A call that names a device: `cuda` becomes the CPU with the results marked; `cpu` of a device
        tensor is a copy to the host (a sync)."""
        em = self.emulator
        to_device = name == "cuda" or any(is_device_like(v) for v in (*args[1:], *kwargs.values()))
        to_host = any(device_kind(v) == "cpu" for v in (*args[1:], kwargs.get("device")))
        if name == "to" and len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): its device
            to_device, to_host = em.on_device(args[1]), not em.on_device(args[1])
        args = tuple(CPU if is_device_like(a) else a for a in args)
        kwargs = {k: CPU if is_device_like(v) else v for k, v in kwargs.items()}
        if name == "cuda":
            func, args, kwargs = torch.Tensor.to, (source, CPU), {"non_blocking": kwargs.get("non_blocking", False)}
        if to_device:
            if name in ("to", "cuda") and not em.on_device(source):
                em.copy_in(f"Tensor.{name}")
                kwargs = {**kwargs, "copy": True}
            elif name in ("tensor", "as_tensor"):
                em.copy_in(f"torch.{name}")
                if name == "as_tensor":
                    func = torch.tensor
            with placing(em, "device"):
                result = func(*args, **kwargs)
            for t in tensors_in(result):
                em.mark(t)
            return result
        if to_host and em.on_device(source):
            em.sync(f"{name}(cpu)")
            with placing(em, "host"):
                return func(*args, **({**kwargs, "copy": True} if name == "to" else kwargs))
        return func(*args, **kwargs)


class DeviceTracking(TorchDispatchMode):
    """The aten-level half: results of ops on device tensors are marked; mixed devices, host reads and
    host-to-device copies are checked; inside a capture, random ops are refused."""

    def __init__(self, emulator):
        super().__init__()
        self.emulator = emulator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        em = self.emulator
        inputs = tensors_in((args, kwargs))
        on_device = [em.on_device(t) for t in inputs]
        device_op = any(on_device) or em.placement == "device"
        if device_op and em.placement != "host":
            for t, d in zip(inputs, on_device):
                if not d and em.on_device(t, em.unplaced):
                    em.mark(t)
            on_device = [em.on_device(t) for t in inputs]
            self.check(func, args, kwargs, inputs, on_device)
            em.counts.ops += 1
        result = func(*args, **kwargs)
        if device_op and em.placement != "host":
            for t in tensors_in(result):
                em.mark(t)
        elif not inputs and em.placement is None:
            for t in tensors_in(result):
                em.mark(t, em.unplaced)
        return result

    def check(self, func, args, kwargs, inputs, on_device):
        em = self.emulator
        if em.capturing is not None and torch.Tag.nondeterministic_seeded in func.tags:
            raise EmulationError(f"random-number op {func} inside CUDA graph capture")
        if func is aten._local_scalar_dense.default:
            em.sync("a device value read on the host")
            return
        if any(tag in func.tags for tag in DATA_DEPENDENT_TAGS) and not integer_indexing(func, inputs):
            em.sync(f"{func}, whose output size depends on the data")
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if em.on_device(dst) and not em.on_device(src):
                em.copy_in("copy_ from a host tensor")
            elif em.on_device(src) and not em.on_device(dst):
                em.sync("copy_ into a host tensor")
            return
        host = [t for t, d in zip(inputs, on_device) if not d and t.dim() > 0]
        if host and any(on_device):
            if func in HOST_INDEX_OPS:
                em.copy_in(f"host indices for {func}")
            else:
                raise EmulationError(f"{func} mixes cuda:0 and cpu tensors (shapes "
                                     f"{[tuple(t.shape) for t in host]} on the host)")


def integer_indexing(func, inputs):
    """Indexing with integer indices has a static shape (a boolean mask would not)."""
    return func in HOST_INDEX_OPS and all(not (t.dtype == torch.bool or t.dtype == torch.uint8)
                                           for t in inputs[1:])


class Recorder(TorchDispatchMode):
    """Records the device ops of a capture, and keeps a copy of every device storage they read that
    existed before the capture, to undo what they write. (Not only of the arguments their schemas mark
    as written: native_batch_norm updates its running statistics without saying so.)"""

    def __init__(self, emulator, graph):
        super().__init__()
        self.emulator, self.graph = emulator, graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        em = self.emulator
        inputs = tensors_in((args, kwargs))
        # device ops, and C++'s factories that may be (sphrun's host factories come placed on the host)
        device_op = em.placement == "device" or any(em.on_device(t) for t in inputs) or (
            not inputs and em.placement is None)
        if device_op and em.placement != "host":
            with placing(em, "host"):  # the saved copies are the model's bookkeeping, not the step's work
                for t in inputs:
                    storage = storage_of(t)
                    if storage._cdata not in self.graph.seen:
                        self.graph.seen[storage._cdata] = storage
                        self.graph.overwritten.append((storage, storage.clone()))
        result = func(*args, **kwargs)
        if device_op and em.placement != "host":
            self.graph.recording.append((func, args, kwargs, result))
            for t in tensors_in(result):  # made by the capture: nothing to undo there
                self.graph.seen[storage_of(t)._cdata] = storage_of(t)
        return result


class Graph:
    """torch.cuda.CUDAGraph, modelled: see the module's docstring."""

    def __init__(self, emulator):
        self.emulator = emulator
        self.recording, self.overwritten, self.seen = [], [], {}  # seen: storages by address, held
        self.replays = 0
        emulator.graphs.append(self)

    @contextlib.contextmanager
    def capture(self):
        em = self.emulator
        if em.capturing is not None:
            raise EmulationError("a capture inside a capture")
        em.capturing = self
        try:
            with Recorder(em, self):
                yield
        finally:
            em.capturing = None
            with torch.no_grad(), placing(em, "host"):  # a capture runs no kernel: undo what it wrote
                for storage, saved in self.overwritten:
                    storage.copy_(saved)
            self.overwritten, self.seen = [], {}
        for fault in em.faults:
            fault(self)

    def kernels(self):
        """The recorded ops that launch work on a GPU: not views (they alias their input, which a
        graph does not replay) and not allocations."""
        def launches(func):
            returns = func._schema.returns
            aliasing = returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write
            return not aliasing and func not in ALLOCATIONS
        return [op for op in self.recording if launches(op[0])]

    def reset(self):
        """CUDAGraph.reset: the graph is deleted, and the results its capture holds are freed."""
        self.recording = []

    def replay(self):
        self.replays += 1
        with torch.no_grad(), torch._C.DisableTorchFunction():  # kernels run, no Python-level call
            for func, args, kwargs, recorded in self.recording:
                result = func(*args, **kwargs)
                for old, new in zip(tensors_in(recorded), tensors_in(result)):
                    if not (old.data_ptr() == new.data_ptr() and old.stride() == new.stride()):
                        old.copy_(new)  # into the memory the capture gave this result



class GraphHandle:
    """What torch.cuda.CUDAGraph() gives sphrun: its Graph, reset once sphrun drops the handle."""

    def __init__(self, graph):
        self.graph = graph
        weakref.finalize(self, graph.reset)

    def __getattr__(self, name):
        return getattr(self.graph, name)


def invalidated_capture(graph):
    """A fault: the capture raises at its end, as a real one does that an illegal op invalidated."""
    raise RuntimeError("CUDA error: operation failed due to a previous error during capture\n"
                       "CUDA kernel errors might be asynchronously reported at some other API call")


class Stream:
    """A CUDA stream: work is in order on the CPU, so waiting is a no-op."""

    def __init__(self, device=None, priority=0):
        self.device = device

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


@contextlib.contextmanager
def emulated_cuda(monkeypatch):
    """Make torch see one CUDA device whose tensors live on the CPU; yields the Emulator."""
    emulator = Emulator()
    real_autocast = torch.autocast
    stream = Stream(CUDA)
    patches = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "get_device_name"): lambda device=None: "emulated CUDA device",
        (torch.cuda, "is_bf16_supported"): lambda *a, **k: True,
        (torch.cuda, "synchronize"): lambda device=None: emulator.sync("torch.cuda.synchronize"),
        (torch.cuda, "Stream"): Stream,
        (torch.cuda, "current_stream"): lambda device=None: stream,
        (torch.cuda, "stream"): lambda s: contextlib.nullcontext(),
        (torch.cuda, "set_stream"): lambda s: None,
        (torch.cuda, "mem_get_info"): lambda device=None: (emulator.free(), emulator.total_memory),
        (torch.cuda, "memory_allocated"): lambda device=None: emulator.allocated,
        (torch.cuda, "max_memory_allocated"): lambda device=None: emulator.peak,
        (torch.cuda, "reset_peak_memory_stats"): lambda device=None: setattr(emulator, "peak", emulator.allocated),
        (torch.cuda, "empty_cache"): lambda: None,
        (torch.cuda, "CUDAGraph"): lambda *a, **k: GraphHandle(Graph(emulator)),
        (torch.cuda, "graph"): lambda graph, *a, **k: graph.capture(),
        (torch._C, "_cuda_setDevice"): lambda index: None,
        (torch, "autocast"): lambda device_type, *a, **k: real_autocast(
            "cpu" if device_type == "cuda" else device_type, *a, **k),
    }
    for (owner, name), value in patches.items():
        monkeypatch.setattr(owner, name, value)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled)
    # The emulated GPU computes with PyTorch's native CPU kernels: oneDNN's channels_last convolutions
    # corrupted the heap under this emulation (a crash in their backward, tests later; not seen
    # without it), and sphrun's CPU form never uses channels_last.
    torch.backends.mkldnn.enabled = False
    try:
        with DevicePlacement(emulator), DeviceTracking(emulator):
            yield emulator
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled) = flags
