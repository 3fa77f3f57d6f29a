"""GRPO with multi-turn tool rollouts: `torchrun -m trainers.rl --config job.json`."""
