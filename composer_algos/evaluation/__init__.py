"""Evaluation: FID on any feature module, bits/dim from the VLB, sample grids, heatmaps and consistency."""

from composer_algos.evaluation.checkpoint_weights import load_checkpoint_weights
from composer_algos.evaluation.consistency import consistency_diagnostic, pair_statistics
from composer_algos.evaluation.features import (
    DigitClassifier,
    DigitFeatures,
    InceptionFeatures,
    build_feature_extractor,
    digit_classifier_path,
    load_or_train_digit_classifier,
    train_digit_classifier,
)
from composer_algos.evaluation.fid import collect_images, fid_from_samples, fid_metric, real_vs_real_fid, update_fid
from composer_algos.evaluation.generation import (
    ema_weights,
    eval_mode,
    gather_by_index,
    generate_samples,
    generate_share,
    rank_indices,
    reshard_fsdp2,
    sample_noise,
)
from composer_algos.evaluation.likelihood import bits_per_dim, vlb_timesteps
from composer_algos.evaluation.plots import (
    image_grid,
    metric_curve_png,
    save_png,
    side_by_side_grid,
    timestep_heatmap_png,
)
from composer_algos.evaluation.report import EVALUATION_DEFAULTS, evaluate_checkpoint, evaluate_model

__all__ = [
    'DigitClassifier',
    'DigitFeatures',
    'EVALUATION_DEFAULTS',
    'InceptionFeatures',
    'bits_per_dim',
    'build_feature_extractor',
    'collect_images',
    'consistency_diagnostic',
    'digit_classifier_path',
    'ema_weights',
    'eval_mode',
    'evaluate_checkpoint',
    'evaluate_model',
    'fid_from_samples',
    'fid_metric',
    'gather_by_index',
    'generate_samples',
    'generate_share',
    'image_grid',
    'load_checkpoint_weights',
    'load_or_train_digit_classifier',
    'metric_curve_png',
    'pair_statistics',
    'rank_indices',
    'real_vs_real_fid',
    'reshard_fsdp2',
    'sample_noise',
    'save_png',
    'side_by_side_grid',
    'timestep_heatmap_png',
    'train_digit_classifier',
    'update_fid',
    'vlb_timesteps',
]
