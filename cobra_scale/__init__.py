"""cobra_scale: industrial-scale trainer and server for COBRA.

The package layout follows the data path:

    data -> semantic_ids -> model -> train -> retrieve -> serve -> eval

Model math never imports ``ray`` or ``deepspeed``; distribution lives in the
training and serving layers.
"""

__version__ = "0.1.0"
