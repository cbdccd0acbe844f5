"""CPU hosts: the machine's cores shared by the run's actors on it according to who computes now."""
