"""Loading images and shard members for the chain: references, local and data: reads, HTTP, S3, decode.

May import scalecap.errors, scalecap.settings and scalecap.netguard; never the fleet, backends or workers.
"""

from scalecap.images.load import ImageLimits, load_image

__all__ = ["ImageLimits", "load_image"]
