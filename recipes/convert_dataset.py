"""Write an image dataset as MDS shards for StreamingDataset.

    python recipes/convert_dataset.py --dataset digits --out data/digits
    python recipes/convert_dataset.py --dataset cifar10 --out data/cifar10 --download-root /tmp/cifar
    python recipes/convert_dataset.py --dataset folder --src /path/to/images --out s3://bucket/images/train

``digits`` is scikit-learn's bundled 8x8 digits (no download) written as ``OUT/train`` and ``OUT/val``;
``cifar10`` downloads through torchvision; ``folder`` reads a folder of images (sub-folders are classes) with
parallel decoding and writes one split to OUT, which may be a local folder or any remote URL that
mosaicml-streaming can upload to (``s3://``, ``gs://``, ``oci://``, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

from composer_algos.data.convert import cifar10_images, convert_digits, folder_images, write_mds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', choices=['digits', 'cifar10', 'folder'], required=True)
    parser.add_argument('--out', required=True, help='output folder or remote URL')
    parser.add_argument('--src', help='image folder (for --dataset folder)')
    parser.add_argument('--download-root', default='./cifar10-download', help='where torchvision puts CIFAR-10')
    parser.add_argument('--size-limit', default='64mb', help='shard size limit, e.g. 64mb')
    parser.add_argument('--workers', type=int, default=8, help='decoding threads (folder)')
    parser.add_argument('--compression', default=None, help='shard compression, e.g. zstd')
    args = parser.parse_args(argv)

    if args.dataset == 'digits':
        convert_digits(args.out, progress=True)
    elif args.dataset == 'cifar10':
        for split in ('train', 'val'):
            write_mds(cifar10_images(args.download_root, split), os.path.join(args.out, split),
                      size_limit=args.size_limit, total=50000 if split == 'train' else 10000,
                      compression=args.compression)
    else:
        if not args.src:
            parser.error('--dataset folder needs --src PATH')
        images, count, classes = folder_images(args.src, workers=args.workers)
        print(f'{count} images in {len(classes)} classes under {args.src}')
        write_mds(images, args.out, size_limit=args.size_limit, total=count, compression=args.compression)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
