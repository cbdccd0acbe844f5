"""`learner.backend: megatron`: the megatron-core learner and the HF <-> Megatron weight layout."""
