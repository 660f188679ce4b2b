/**
 * The qcow2 engine, for code outside this plugin (tests, tools, and the appliance mocks, which may
 * keep their data in our own format): the engine's public module, engine/index.ts.
 */
export * from './engine/index.js';
