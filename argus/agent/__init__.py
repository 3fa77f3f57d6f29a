"""The DeepEyesV2 agent loop: one environment used by data generation, evaluation and RL rollouts."""
