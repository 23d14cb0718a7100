"""Stage 4: writing the DPE checkpoint (settings, presets, generated files, card, the folder itself, upgrades).
"""
