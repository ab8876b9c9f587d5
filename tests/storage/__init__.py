"""Storage providers: one contract suite over local, GCS, R2 and Cloudflare Images, plus the chain."""
