"""Reproduction scripts for the paper's experiments (WIDER Attribute, PA-100K, MS-COCO)."""
