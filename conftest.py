# Makes the repository root importable in tests (models, layers, entropy, utils) without installing it.
