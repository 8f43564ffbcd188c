"""Curriculum timestep schedule (arXiv 2404.07946): a prior that moves t from uniform towards the harder timesteps."""

from composer_algos.algorithms.curriculum_timestep_schedule.curriculum_timestep_schedule import (
    COORDINATES,
    CurriculumTimestepSchedule,
    clts_probs,
    difficulty_coordinate,
)

# The algorithm first: it is what the folder's name registers.
__all__ = ['CurriculumTimestepSchedule', 'COORDINATES', 'clts_probs', 'difficulty_coordinate']
