"""Model: InternVL backbone, spatial tokens, SAM2 seg head, depth VQ-VAE, PerceptioModel."""
