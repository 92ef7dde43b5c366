"""Bundled real datasets, offline, in the Shopee layout: digits and photographs."""
