"""The machine fingerprint, and FID that does not depend on the CPU kernels: one checkpoint scored under two
instruction sets in two processes."""

import json
import os
import subprocess
import sys

import torch

from composer_algos.machine import KERNEL_ENVIRONMENT, fingerprint_key, machine_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kernels of a machine without AVX: ATen's scalar code, oneDNN and MKL held to SSE4.
PLAIN_KERNELS = {'ATEN_CPU_CAPABILITY': 'default', 'DNNL_MAX_CPU_ISA': 'SSE41', 'MKL_ENABLE_INSTRUCTIONS': 'SSE4_2'}


def _fingerprint_in(env: dict[str, str]) -> dict:
    code = (
        'import json; from composer_algos.machine import machine_fingerprint; print(json.dumps(machine_fingerprint()))'
    )
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout
    return json.loads(out)


def test_fingerprint_names_what_the_kernels_depend_on():
    here = machine_fingerprint()
    assert here['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert here['torch'] == torch.__version__ and here['threads'] == torch.get_num_threads()
    assert fingerprint_key(here) == fingerprint_key(dict(here)) and len(fingerprint_key(here)) == 8
    plain = _fingerprint_in(PLAIN_KERNELS)
    assert plain['cpu_capability'] == 'NO AVX'
    assert plain['environment'] == PLAIN_KERNELS and set(PLAIN_KERNELS) <= set(KERNEL_ENVIRONMENT)
    assert fingerprint_key(plain) != fingerprint_key(_fingerprint_in({}))


def test_one_checkpoint_scores_the_same_fid_under_two_instruction_sets(digits_mds, tmp_path):
    save = tmp_path / 'checkpoints'
    recipe = os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml')
    data = [f'train_loader.local={digits_mds}', f'eval_loader.local={digits_mds}']
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'recipes', 'train.py'),
            recipe,
            'max_duration=300ba',
            'callbacks=null',
            'progress_bar=false',
            f'save_folder={save}',
            'save_interval=300ba',
            f'loggers.file.filename={tmp_path}/log.txt',
            'run_name=capability',
            *data,
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    checkpoint = (
        str(save / 'ep1-ba300-rank0.pt')
        if (save / 'ep1-ba300-rank0.pt').exists()
        else str(next(p for p in save.iterdir() if p.name.endswith('.pt') and 'latest' not in p.name))
    )
    scores = {}
    for name, env in (('native', {}), ('plain', PLAIN_KERNELS)):
        out = tmp_path / name
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, 'recipes', 'evaluate.py'),
                checkpoint,
                '--config',
                recipe,
                '--out',
                str(out),
                'num_samples=500',
                'num_steps=25',
                'bpd_images=8',
                'bpd_terms=4',
                'grid_samples=4',
                *data,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, **env},
        )
        scores[name] = json.loads((out / 'evaluation.json').read_text())
    native, plain = scores['native']['FID'], scores['plain']['FID']
    # A trained model: far from the real digits' floor it would not be, far from random noise it is.
    assert 0 < native < 100
    assert abs(native - plain) <= 0.005 * native, (native, plain)
    assert scores['native']['feature_sha256'] == scores['plain']['feature_sha256']
