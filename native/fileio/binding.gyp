{
  "targets": [
    {
      "target_name": "offload_fileio",
      "sources": ["addon.c", "common.c", "seek.c", "copy.c", "writes.c", "bgio.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "libraries": ["-lpthread", "-ldl"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
