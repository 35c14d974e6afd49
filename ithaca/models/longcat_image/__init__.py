"""LongCat-Image (meituan-longcat/LongCat-Image)."""
