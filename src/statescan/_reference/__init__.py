"""numpy reference implementations: the definitions the compiled kernels are tested against,
and the fallback backend."""
