{
  "targets": [
    {
      "target_name": "offload_seek",
      "sources": ["seek.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
