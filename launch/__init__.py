"""accelerate launch configs and a SLURM script for cdmctl distill (copy them; see README, "Scaling out")."""
