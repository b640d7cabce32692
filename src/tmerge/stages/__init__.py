"""Experiment stages: source training (task1, task2, All-HCP) and the BraTS target stages."""
