"""Train the FID feature extractors that ship with the package: the digit classifiers of the digits and MNIST tiers.

    python recipes/train_feature_extractors.py            # retrain both, overwrite composer_algos/evaluation/weights/
    python recipes/train_feature_extractors.py --check    # retrain in a temporary folder; compare with the shipped ones

Run only on purpose: every FID in docs/ was measured on the shipped weights, and weights trained on another machine
differ (CPU kernels round differently on other instruction sets), which moves the FID scale. The benchmark pins the
shipped weights' sha256 and refuses others. Each classifier trains deterministically on one thread; the manifest
records its config, validation accuracy, sha256 and the machine fingerprint it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from composer_algos.evaluation.features import (
    CLASSIFIER_CONFIGS,
    SHIPPED_WEIGHTS_DIR,
    shipped_classifiers,
    train_and_save_classifier,
    weights_sha256,
)
from composer_algos.machine import machine_fingerprint

# name -> config overrides of the dataset's default (composer_algos.evaluation.features.CLASSIFIER_CONFIGS).
SHIPPED: dict[str, dict[str, Any]] = {
    'digits': {},  # the digits tier: 8x8 scikit-learn digits (the default config)
    'mnist5k-16': {'dataset': 'mnist5k', 'image_size': 16},  # the MNIST tier: 16x16 MNIST digits
}


def train_all(folder: str) -> dict[str, dict]:
    """Train every shipped classifier into ``folder`` and write its ``manifest.json``; return the manifest."""
    manifest = {}
    for name, overrides in SHIPPED.items():
        config = {**CLASSIFIER_CONFIGS[overrides.get('dataset', 'digits')], **overrides}
        path = os.path.join(folder, f'{name}.pt')
        model, accuracy = train_and_save_classifier(config, path)
        manifest[name] = {
            'file': f'{name}.pt',
            'config': config,
            'sha256': weights_sha256(model.state_dict()),
            'accuracy': accuracy,
            'trained_on': {**machine_fingerprint(), 'threads': 1},
        }
        print(f'{name}: validation accuracy {accuracy:.4f}, sha256 {manifest[name]["sha256"]}', flush=True)
    with open(os.path.join(folder, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write('\n')
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--check',
        action='store_true',
        help='train into a temporary folder and say whether the weights equal the shipped ones',
    )
    args = parser.parse_args(argv)
    if not args.check:
        train_all(SHIPPED_WEIGHTS_DIR)
        return 0
    shipped = shipped_classifiers()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = train_all(tmp)
    same = True
    for name, entry in fresh.items():
        equal = shipped.get(name, {}).get('sha256') == entry['sha256']
        same &= equal
        print(f'{name}: {"equal to" if equal else "DIFFERENT from"} the shipped weights')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
