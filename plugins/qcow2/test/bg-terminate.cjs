// Child of background-io.test.ts: worker threads start many background reads, writes and a sync
// through the native helper, and are terminated with them in flight; then this thread uses the
// helper. Prints "done N" and exits 0, or crashes (the helper touched freed buffers, or ran in a
// library Node had unloaded).
//   node bg-terminate.cjs ADDON FILE ROUNDS
const { Worker, isMainThread, parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');

if (isMainThread) {
  const [addonPath, file, rounds] = process.argv.slice(2);
  fs.writeFileSync(file, Buffer.alloc(8 << 20, 1));
  (async () => {
    for (let i = 0; i < Number(rounds); i++) {
      const w = new Worker(__filename, { workerData: { addonPath, file } });
      await new Promise((resolve) => w.once('message', resolve));
      await w.terminate();
    }
    const addon = require(addonPath);
    const fd = fs.openSync(file, 'r+');
    const n = await addon.backgroundRead(fd, Buffer.alloc(1 << 20), 0);
    await addon.backgroundWrite(fd, Buffer.alloc(4096, 9), 0);
    await addon.backgroundSync(fd);
    fs.closeSync(fd);
    process.stdout.write(`done ${n}\n`);
  })();
} else {
  const addon = require(workerData.addonPath);
  const fd = fs.openSync(workerData.file, 'r+');
  for (let k = 0; k < 64; k++) {
    void addon.backgroundRead(fd, new Uint8Array(1 << 20), (k % 8) << 20);
    void addon.backgroundWrite(fd, new Uint8Array(256 << 10).fill(k), (k % 8) << 20);
  }
  void addon.backgroundSync(fd);
  parentPort.postMessage('busy');
}
