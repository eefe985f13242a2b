"""p2r algorithms: the SFT and PA-GRPO modules and the pure math they share."""
