"""The kernels compiled for the installing machine (-march=native); see statescan._dispatch."""
