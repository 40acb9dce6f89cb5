"""The bundled reference model: a small, really trained FLUX pipeline on handwritten digits."""
