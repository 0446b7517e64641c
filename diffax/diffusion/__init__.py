"""The diffusion maths of diffax: schedules, parameterisations, losses, samplers and likelihoods."""
