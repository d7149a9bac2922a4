"""What the notebooks call: analytic figures and claims, split-training experiments, the real-model fine-tune,
figure saving with provenance and the notebook runner. Source: README.md, "Figures"."""
