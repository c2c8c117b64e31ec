from vqfunc.residual._quantize import ResidualConfig as ResidualConfig
