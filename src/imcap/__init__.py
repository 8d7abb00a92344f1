"""imcap: image captioning that works offline, on the one transformers VisionEncoderDecoder path."""

from imcap.encoder import register as _register_encoder

_register_encoder()  # so that AutoConfig/AutoModel (and VisionEncoderDecoderModel) resolve our encoder type

__version__ = "0.1.0"
