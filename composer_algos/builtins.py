"""The built-in parts that are not algorithm folders, by name, as ``module:attribute`` entry-point targets.

``setup.py`` turns this table, and every folder of ``composer_algos/algorithms/`` (registered under the folder's
name: the first name in its ``__init__``'s ``__all__``), into the package's own ``composer_algos_<kind>`` entry
points, the way other packages register theirs. So importing any registry is enough to resolve every built-in by
name, and adding an algorithm folder needs no edit here (reinstall the package to refresh the entry points). This
module imports nothing: ``setup.py`` reads it without importing the package.
"""

BUILTINS = {
    'models': {'diffusion': 'composer_algos.diffusion.build:build_diffusion_model'},
    'denoisers': {
        'unet': 'composer_algos.diffusion.denoisers:build_unet',
        'dit': 'composer_algos.diffusion.denoisers:build_dit',
        'unet_condition': 'composer_algos.diffusion.denoisers:build_unet_condition',
        'sd3_transformer': 'composer_algos.diffusion.denoisers:build_sd3_transformer',
        'pixart_transformer': 'composer_algos.diffusion.denoisers:build_pixart_transformer',
        'conv': 'composer_algos.diffusion.denoisers:TimeConditionedConvNet',
    },
    'encoders': {'vae': 'composer_algos.data.latents:build_vae_encoder'},
    'conditioners': {
        'none': 'composer_algos.diffusion.conditioning:NoConditioner',
        'class_label': 'composer_algos.diffusion.conditioning:ClassLabelConditioner',
        'text': 'composer_algos.diffusion.text_conditioning:TextConditioner',
    },
    'datasets': {'streaming_image': 'composer_algos.data.streaming:build_streaming_image_dataloader'},
    'algorithms': {'gradient_clipping': 'composer.algorithms:GradientClipping'},
    'callbacks': {
        'fid': 'composer_algos.callbacks.fid:FID',
        'bits_per_dim': 'composer_algos.callbacks.likelihood:BitsPerDim',
        'loss_bands': 'composer_algos.callbacks.likelihood:LossBands',
        'sample_grid': 'composer_algos.callbacks.pictures:SampleGrid',
        'prompt_accuracy': 'composer_algos.callbacks.prompt_accuracy:PromptAccuracy',
        'timestep_heatmap': 'composer_algos.callbacks.pictures:TimestepHeatmap',
    },
    'optimizers': {
        'adam': 'torch.optim:Adam',
        'adamw': 'torch.optim:AdamW',
        'sgd': 'torch.optim:SGD',
        'decoupled_adamw': 'composer.optim:DecoupledAdamW',
        'decoupled_sgdw': 'composer.optim:DecoupledSGDW',
        'schedulefree_adamw': 'composer_algos.algorithms.schedule_free:schedulefree_adamw',
    },
    'schedulers': {
        'constant': 'composer.optim.scheduler:ConstantScheduler',
        'constant_with_warmup': 'composer.optim.scheduler:ConstantWithWarmupScheduler',
        'cosine': 'composer.optim.scheduler:CosineAnnealingScheduler',
        'cosine_with_warmup': 'composer.optim.scheduler:CosineAnnealingWithWarmupScheduler',
        'linear': 'composer.optim.scheduler:LinearScheduler',
        'linear_with_warmup': 'composer.optim.scheduler:LinearWithWarmupScheduler',
        'multistep': 'composer.optim.scheduler:MultiStepScheduler',
        'multistep_with_warmup': 'composer.optim.scheduler:MultiStepWithWarmupScheduler',
        'polynomial_with_warmup': 'composer.optim.scheduler:PolynomialWithWarmupScheduler',
    },
    'loggers': {
        'file': 'composer.loggers:FileLogger',
        'tensorboard': 'composer.loggers:TensorboardLogger',
        'wandb': 'composer.loggers:WandBLogger',
        'mlflow': 'composer.loggers:MLFlowLogger',
        'in_memory': 'composer.loggers:InMemoryLogger',
    },
    'features': {
        'digits': 'composer_algos.evaluation.features:digit_features',
        'mnist': 'composer_algos.evaluation.features:mnist_features',
        'inception': 'composer_algos.evaluation.features:inception_features',
    },
}
