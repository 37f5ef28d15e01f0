"""Loading images and shard members for the chain: references, local and data: reads, HTTP, S3, decode.

May import scalecap.errors, scalecap.settings and scalecap.netguard; never the fleet, backends or
workers. Dependencies point one way: load (the public face) -> shards -> s3, local, fetch ->
transient, limits, refs; decode -> limits, refs.
"""

from scalecap.images.decode import decode_gate, encode_data_url
from scalecap.images.limits import ImageLimits
from scalecap.images.load import ImageBytes, load_image, read_image_bytes
from scalecap.images.local import allowed_local_path, under_roots
from scalecap.images.refs import describe_source, image_ref_kind, is_shard_ref, locations, parse_ref
from scalecap.images.s3 import bucket_allowed, bucket_refusal, s3_client

__all__ = [
    "ImageBytes",
    "ImageLimits",
    "allowed_local_path",
    "bucket_allowed",
    "bucket_refusal",
    "decode_gate",
    "describe_source",
    "encode_data_url",
    "image_ref_kind",
    "is_shard_ref",
    "load_image",
    "locations",
    "parse_ref",
    "read_image_bytes",
    "s3_client",
    "under_roots",
]
