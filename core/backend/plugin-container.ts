/**
 * Loading plugins: each plugin is one inversify ContainerModule that binds its BackendFactory
 * (multi-injection), any CliContributions and any FileFormats. Kept apart from the public index so
 * that code which needs no plugins (`offload img`, the engine) never loads inversify.
 */
import 'reflect-metadata';
import { Container, type ContainerModule } from 'inversify';
import { CliContribution } from '../cli/contribution.js';
import { FileFormat } from './file-format.js';
import { BackendFactory } from './plugin.js';

export interface LoadedPlugins {
  factories: BackendFactory<object>[];
  contributions: CliContribution[];
  /** Image file formats for `volume export|import` (core adds its own `raw`). Absent: none. */
  formats?: FileFormat[];
}

export async function loadPlugins(modules: readonly ContainerModule[]): Promise<LoadedPlugins> {
  const container = new Container();
  await container.loadAsync(...modules);
  const all = <T>(token: symbol): T[] => (container.isBound(token) ? container.getAll<T>(token) : []);
  return {
    factories: all<BackendFactory<object>>(BackendFactory),
    contributions: all<CliContribution>(CliContribution),
    formats: all<FileFormat>(FileFormat),
  };
}
