"""What a CPU run's floating-point results depend on besides its inputs: the machine fingerprint.

CPU kernels pick their code by instruction set (ATen's AVX2/AVX512 kernels, oneDNN's JIT convolutions, MKL's
GEMM), and each rounds differently; training amplifies the last bits, so a seed gives the same run only on machines
of one fingerprint. Results that pair runs (a speed-up, an A/A null) pair runs of one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import Any

import torch

__all__ = ['KERNEL_ENVIRONMENT', 'fingerprint_key', 'machine_fingerprint']

# Environment variables that change which CPU kernels run (read by ATen, oneDNN and MKL when they start).
KERNEL_ENVIRONMENT = (
    'ATEN_CPU_CAPABILITY',
    'DNNL_MAX_CPU_ISA',
    'ONEDNN_MAX_CPU_ISA',
    'MKL_CBWR',
    'MKL_ENABLE_INSTRUCTIONS',
    'MKL_DEBUG_CPU_TYPE',
)


def _cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key in ('model name', 'cpu family', 'model', 'stepping') and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get('model name', platform.machine())
    numbers = '/'.join(fields[k] for k in ('cpu family', 'model', 'stepping') if k in fields)
    return f'{name} ({numbers})' if numbers else name


def machine_fingerprint() -> dict[str, Any]:
    """The kernel-relevant facts of this process: ATen's CPU capability, the CPU model, torch's version, the thread
    count, whether oneDNN is on, and the environment variables that override kernel dispatch (when set)."""
    return {
        'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'cpu_model': _cpu_model(),
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'mkldnn': bool(torch.backends.mkldnn.enabled),
        'environment': {k: os.environ[k] for k in KERNEL_ENVIRONMENT if k in os.environ},
    }


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short name of a fingerprint (8 hex digits), equal for equal fingerprints."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
