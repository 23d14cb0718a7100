"""Stage 3: finding each frequency group's scale factor on the model itself (dim_scores, selection, scales, result).
"""
