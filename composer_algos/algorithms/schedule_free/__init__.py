"""Schedule-free AdamW (arXiv 2405.15682): the optimizer, and switching between its training and evaluation weights."""

from composer_algos.algorithms.schedule_free.schedule_free import (
    ScheduleFree,
    add_schedule_free,
    is_schedule_free,
    schedulefree_adamw,
    to_eval_weights,
    to_train_weights,
)

__all__ = [
    'ScheduleFree',
    'add_schedule_free',
    'is_schedule_free',
    'schedulefree_adamw',
    'to_eval_weights',
    'to_train_weights',
]
