/**
 * File names as qemu-img reports them. qemu keeps the name the user typed for the top image and
 * names each backing file by textually joining the folder part of its child's name with the stored
 * backing name (`path_combine`): "h2x/top.qcow2" + "mid.qcow2" → "h2x/mid.qcow2", no normalising.
 */
export function pathCombine(baseName: string, backingName: string): string {
  if (backingName.startsWith('/')) return backingName;
  const slash = baseName.lastIndexOf('/');
  return baseName.slice(0, slash + 1) + backingName;
}
