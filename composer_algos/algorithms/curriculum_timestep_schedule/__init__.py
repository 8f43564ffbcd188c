"""Curriculum timestep schedule (arXiv 2404.07946): a prior that moves t from uniform towards the harder timesteps."""

from composer_algos.algorithms.curriculum_timestep_schedule.curriculum_timestep_schedule import (
    COORDINATES, CurriculumTimestepSchedule, clts_probs, difficulty_coordinate)

__all__ = ['COORDINATES', 'CurriculumTimestepSchedule', 'clts_probs', 'difficulty_coordinate']
