"""One batched call for a stack of symmetric eigendecompositions on a GPU: cuSOLVER's ``XsyevBatched``.

``torch.linalg.eigh`` on CUDA hands a batch of matrices larger than 32 x 32 to cuSOLVER one matrix at a
time (pytorch/pytorch#175585): 16 Gram matrices of 576 x 576, LoFi's selection at LLaVA-1.5-7B shape,
took 94 ms on an H200, about 6 ms each. ``cusolverDnXsyevBatched`` (cuSOLVER >= 11.7.1, CUDA >= 12.6.2)
decomposes the whole stack in one call; JAX dispatches batched ``eigh`` to it at every size
(jax-ml/jax#31375). PyTorch ships the library but does not expose the call, so this module binds it with
``ctypes`` from the copy of ``libcusolver`` torch has loaded: no build step and no new dependency.

What it owns: finding the library, the C prototypes, a handle per device and thread on torch's current
stream, the column-major bookkeeping, and a check against ``torch.linalg.eigh`` the first time each
device and dtype is used (a mismatch raises instead of returning wrong leverage scores).
``lofi.linalg.symmetric_eigh`` calls it when the route is ``"cusolver-batched"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

CUDA_R_32F, CUDA_R_64F = 0, 1  # cudaDataType
EIG_MODE_NOVECTOR, EIG_MODE_VECTOR = 0, 1  # cusolverEigMode_t
FILL_MODE_UPPER = 1  # cublasFillMode_t
_DATA_TYPES = {torch.float32: CUDA_R_32F, torch.float64: CUDA_R_64F}

_p, _i, _i64, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
# name -> argument types; every function returns a cusolverStatus_t (0 = success). Enums are C ints.
PROTOTYPES = {
    "cusolverDnCreate": [ctypes.POINTER(_p)],
    "cusolverDnSetStream": [_p, _p],
    "cusolverDnCreateParams": [ctypes.POINTER(_p)],
    "cusolverDnXsyevBatched_bufferSize": [_p, _p, _i, _i, _i64, _i, _p, _i64, _i, _p, _i,
                                          ctypes.POINTER(_size), ctypes.POINTER(_size), _i64],
    "cusolverDnXsyevBatched": [_p, _p, _i, _i, _i64, _i, _p, _i64, _i, _p, _i, _p, _size, _p, _size, _p, _i64],
}


class CusolverError(RuntimeError):
    """The batched route cannot run here; the message says why and names the way back to torch's route."""


def bind(symbols) -> dict:
    """The functions of ``PROTOTYPES`` from ``symbols`` (a ``ctypes.CDLL``, or anything whose attributes
    are functions of the same signatures), each with its argument and return types set."""
    functions = {}
    for name, argtypes in PROTOTYPES.items():
        try:
            function = getattr(symbols, name)
        except AttributeError:
            raise CusolverError(f"{name} is missing from the loaded cuSOLVER: the batched route needs "
                                "cuSOLVER >= 11.7.1 (CUDA >= 12.6.2); use LOFI_EIGH=torch") from None
        function.argtypes, function.restype = argtypes, ctypes.c_int
        functions[name] = function
    return functions


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CusolverError(f"{call} returned cusolverStatus {status}; use LOFI_EIGH=torch")


@dataclass
class BatchedEigh:
    """``values, vectors = solver(A)``: eigenvalues ascending [..., n] and eigenvectors [..., n, n] (columns)
    of the symmetric matrices A [..., n, n], as ``torch.linalg.eigh(A)`` (its lower triangle is read);
    ``vectors=False`` skips the vectors (``None``). A matrix cuSOLVER could not decompose gets NaN
    eigenvalues rather than a host sync to check.

    ``functions``: from ``bind``; ``stream``: the stream pointer for a tensor's device (torch's current
    stream on CUDA).
    """

    functions: dict
    stream: Callable[[torch.device], int] = field(default=lambda device: torch.cuda.current_stream(device).cuda_stream)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def _handle(self, device: torch.device) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
        handles = vars(self._local).setdefault("handles", {})
        if device not in handles:  # a handle belongs to the device current when it is created
            handle, params = ctypes.c_void_p(), ctypes.c_void_p()
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                _check(self.functions["cusolverDnCreate"](ctypes.byref(handle)), "cusolverDnCreate")
            _check(self.functions["cusolverDnCreateParams"](ctypes.byref(params)), "cusolverDnCreateParams")
            handles[device] = handle, params
        return handles[device]

    def __call__(self, A: torch.Tensor, vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if A.dtype not in _DATA_TYPES:
            raise CusolverError(f"the batched route takes float32 or float64, got {A.dtype}")
        n = A.shape[-1]
        batch = A.shape[:-2].numel()
        # cuSOLVER reads column-major: a row-major symmetric matrix reads as itself, and its upper triangle
        # in column-major order is torch's lower one. The vectors come back column-major: work[b] = V^T.
        work = A.reshape(batch, n, n).clone(memory_format=torch.contiguous_format)
        values = torch.empty(batch, n, dtype=A.dtype, device=A.device)
        info = torch.zeros(batch, dtype=torch.int32, device=A.device)
        if batch and n:
            self._run(work, values, info, EIG_MODE_VECTOR if vectors else EIG_MODE_NOVECTOR)
        values = torch.where(info[:, None] == 0, values, torch.nan).reshape(A.shape[:-1])
        return values, work.mT.reshape(A.shape) if vectors else None

    def _run(self, work: torch.Tensor, values: torch.Tensor, info: torch.Tensor, jobz: int) -> None:
        batch, n, _ = work.shape
        handle, params = self._handle(work.device)
        f, dtype = self.functions, _DATA_TYPES[work.dtype]
        _check(f["cusolverDnSetStream"](handle, ctypes.c_void_p(self.stream(work.device) or None)),
               "cusolverDnSetStream")
        device_bytes, host_bytes = _size(), _size()
        _check(f["cusolverDnXsyevBatched_bufferSize"](
            handle, params, jobz, FILL_MODE_UPPER, n, dtype, work.data_ptr(), n, dtype, values.data_ptr(), dtype,
            ctypes.byref(device_bytes), ctypes.byref(host_bytes), batch), "cusolverDnXsyevBatched_bufferSize")
        # The device workspace is a tensor on the current stream, so the caching allocator reuses it only
        # after this call's kernels; the host one lives until the call returns.
        device_work = torch.empty(max(device_bytes.value, 1), dtype=torch.uint8, device=work.device)
        host_work = ctypes.create_string_buffer(max(host_bytes.value, 1))
        _check(f["cusolverDnXsyevBatched"](
            handle, params, jobz, FILL_MODE_UPPER, n, dtype, work.data_ptr(), n, dtype, values.data_ptr(), dtype,
            device_work.data_ptr(), device_bytes.value, ctypes.addressof(host_work), host_bytes.value,
            info.data_ptr(), batch), "cusolverDnXsyevBatched")


def _library_path() -> str | None:
    """The ``libcusolver`` the process has mapped (torch loads it with its CUDA linear algebra), else the
    system's."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcusolver.so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("cusolver")


_LOADED: list[BatchedEigh] = []  # the process's one solver, once loaded
_CHECKED: set[tuple[torch.device, torch.dtype]] = set()
_LOCK = threading.Lock()


def solver_for(device: torch.device, dtype: torch.dtype) -> BatchedEigh:
    """The batched solver for a CUDA ``device``, loaded and checked against ``torch.linalg.eigh`` once per
    device and dtype; ``CusolverError`` (naming ``LOFI_EIGH=torch``) where it cannot run or disagrees."""
    if device.type != "cuda":
        raise CusolverError(f"the cusolver-batched eigh route needs a CUDA tensor, got {device}")
    with _LOCK:
        if not _LOADED:
            torch.linalg.eigh(torch.eye(2, device=device))  # makes torch load its cuSOLVER
            path = _library_path()
            if path is None:
                raise CusolverError("no libcusolver is loaded in this process or installed; use LOFI_EIGH=torch")
            _LOADED.append(BatchedEigh(bind(ctypes.CDLL(path))))
        if (device, dtype) not in _CHECKED:
            agreement_check(_LOADED[0], device, dtype)
            _CHECKED.add((device, dtype))
    return _LOADED[0]


def agreement_check(solver: BatchedEigh, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``CusolverError`` unless ``solver`` matches ``torch.linalg.eigh`` on a seeded batch of 3
    symmetric 40 x 40 matrices: eigenvalues and the projector on the top 10 eigenvectors within 1e-4
    (float32) or 1e-10 (float64) of the largest eigenvalue."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 60, generator=generator, dtype=torch.float64)
    A = (X @ X.mT / 60).to(device=device, dtype=dtype)
    values, vectors = solver(A)
    expected_values, expected_vectors = torch.linalg.eigh(A)
    top, expected_top = vectors[..., -10:], expected_vectors[..., -10:]
    gaps = [(values - expected_values).abs().max(), (top @ top.mT - expected_top @ expected_top.mT).abs().max()]
    tolerance = (1e-4 if dtype == torch.float32 else 1e-10) * float(expected_values.abs().max())
    if not all(float(gap) <= tolerance for gap in gaps):
        raise CusolverError(f"cusolverDnXsyevBatched disagrees with torch.linalg.eigh on {device} {dtype} "
                            f"(eigenvalues {float(gaps[0]):.2e}, projector {float(gaps[1]):.2e}, tolerance "
                            f"{tolerance:.2e}); use LOFI_EIGH=torch")
