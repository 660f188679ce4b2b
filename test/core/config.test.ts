import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { secrets, type BackendFactory } from '../../core/index.js';
import { loadConfig, validateConfig } from '../../core/config/config.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const san: BackendFactory = {
  kind: 'san',
  description: 'test',
  configSchema: z.strictObject({ name: z.string(), kind: z.literal('san'), endpoint: z.url(), apiToken: z.string(), retries: z.number().int().default(3) }) as never,
  secretFields: ['apiToken'],
  async create() {
    throw new Error('not used');
  },
};
const local: BackendFactory = {
  kind: 'local',
  description: 'test',
  configSchema: z.strictObject({ name: z.string(), kind: z.literal('local'), path: z.string() }) as never,
  async create() {
    throw new Error('not used');
  },
};
const factories = [san, local];
const write = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

describe('config loading', () => {
  it('loads YAML with ${ENV} references and defaults from the plugin schema', () => {
    const p = write('ok.yaml', 'state: ./st\nbackends:\n  - name: s1\n    kind: san\n    endpoint: http://127.0.0.1:8081\n    apiToken: ${TOKEN_X}\n  - {name: l, kind: local, path: ./pool}\n');
    const cfg = loadConfig(p, factories, { TOKEN_X: 'tok-123456' });
    expect(cfg.state).toBe(join(dir, 'st'));
    expect(cfg.baseDir).toBe(dir);
    expect(cfg.backends[0]).toMatchObject({ name: 's1', apiToken: 'tok-123456', retries: 3 });
    expect(cfg.backends[1]).toMatchObject({ name: 'l', path: './pool' });
  });

  it('loads JSON', () => {
    const p = write('ok.json', JSON.stringify({ backends: [{ name: 'l', kind: 'local', path: '/x' }] }));
    expect(loadConfig(p, factories).backends).toHaveLength(1);
  });

  it('names the path of a field that is not a URL', () => {
    expect(() => validateConfig({ backends: [{ name: 'l', kind: 'local', path: '/x' }, { name: 's', kind: 'san', endpoint: 'not a url', apiToken: 'abcd1234' }] }, factories))
      .toThrow('backends[1].endpoint: expected URL');
  });

  it('names a missing field and a wrong type', () => {
    expect(() => validateConfig({ backends: [{ name: 'l', kind: 'local' }] }, factories)).toThrow(/^backends\[0\]\.path: missing \(expected string\)/);
    expect(() => validateConfig({ backends: [{ name: 's', kind: 'san', endpoint: 'http://x', apiToken: 'abcd1234', retries: 'many' }] }, factories))
      .toThrow('backends[0].retries: expected number, got string');
    expect(() => validateConfig({ backends: 'none' }, factories)).toThrow(/^backends: expected array/);
    expect(() => validateConfig({ backends: [], extra: 1 }, factories)).toThrow(/unknown field "extra"/);
  });

  it('an unknown kind lists the known kinds', () => {
    expect(() => validateConfig({ backends: [{ name: 'x', kind: 'zfs' }] }, factories))
      .toThrow('backends[0].kind: unknown kind "zfs" (known kinds: local, san)');
  });

  it('refuses duplicate and invalid backend names', () => {
    expect(() => validateConfig({ backends: [{ name: 'l', kind: 'local', path: 'a' }, { name: 'l', kind: 'local', path: 'b' }] }, factories))
      .toThrow(/backends\[1\]\.name: duplicate/);
    expect(() => validateConfig({ backends: [{ name: '../x', kind: 'local', path: 'a' }] }, factories)).toThrow(/backends\[0\]\.name/);
  });

  it('a missing environment variable names its path', () => {
    expect(() => validateConfig({ backends: [{ name: 's', kind: 'san', endpoint: 'http://x', apiToken: '${NOPE_TOKEN}' }] }, factories, { env: {} }))
      .toThrow('backends[0].apiToken: environment variable NOPE_TOKEN is not set');
  });

  it('broken files give one clear error', () => {
    expect(() => loadConfig(join(dir, 'missing.yaml'), factories)).toThrow(/does not exist/);
    expect(() => loadConfig(write('bad.yaml', 'backends: [unclosed'), factories)).toThrow(/not valid YAML/);
  });

  it('secrets are redacted from errors and from redacted output', () => {
    const secret = 'sup3r-s3cret-token';
    let message = '';
    try {
      validateConfig({ backends: [{ name: 's', kind: 'san', endpoint: secret, apiToken: secret }] }, factories);
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toMatch(/endpoint/);
    expect(secrets.redact(`the token is ${secret}`)).toBe('the token is ***');
    expect(secrets.redactValue({ a: [secret], b: 1 })).toEqual({ a: ['***'], b: 1 });
  });
});

describe('config parse errors never quote the file', () => {
  it('JSON: the position only', () => {
    const p = write('leak.json', '{"backends": [{"name": "s", "kind": "san", "apiToken": Sup3rS3cretValue}]}');
    let msg = '';
    try {
      loadConfig(p, factories);
    } catch (e) {
      msg = (e as Error).message;
    }
    expect(msg).toMatch(/not valid JSON/);
    expect(msg).not.toContain('Sup3rS3cret');
  });

  it('YAML: line and column only', () => {
    const p = write('leak.yaml', 'backends:\n  - name: s\n    apiToken: "Sup3rS3cret\n    kind: [\n');
    let msg = '';
    try {
      loadConfig(p, factories);
    } catch (e) {
      msg = (e as Error).message;
    }
    expect(msg).toMatch(/not valid YAML/);
    expect(msg).not.toContain('Sup3rS3cret');
  });
});
