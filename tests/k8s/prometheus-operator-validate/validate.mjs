// Validate prometheus-operator objects (ServiceMonitor, PodMonitor, ...) with
// the schema validators that @kubernetes-models/prometheus-operator ships
// (Ajv code precompiled from the OpenAPI schemas of the operator's API types;
// PROVENANCE.md beside this file). The same approach as
// ../gateway-api-validate/validate.mjs, for the monitoring.coreos.com group.
//
//   node validate.mjs NODE_MODULES_DIR < objects.json
//
// stdin: a JSON array of objects (what `kubectl kustomize` renders).
// stdout: a JSON array with one result per input object, in input order:
//   {"kind", "name", "model", "errors": [...], "unknownFields": [...]}
// `errors` are the schema's verdict (`new Kind(obj).validate()`, the
// package's documented API). The package's schemas leave unknown fields alone
// (no additionalProperties: false) while `kubectl apply` (strict field
// validation) refuses them: `unknownFields` runs the same validator on a copy
// whose property reads are recorded, and a key the validator never looked at
// is one its schema does not declare. Maps (labels, matchLabels) are
// enumerated by the validator, so any key is allowed there.
// An object this script cannot check gets an error, never an empty result.
// Exit status 0 when every object passed.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const GROUP = "monitoring.coreos.com";
const PACKAGE = "@kubernetes-models/prometheus-operator";

async function modelFor(modules, obj) {
  const [group, version] = String(obj.apiVersion ?? "").split("/");
  const kind = String(obj.kind ?? "");
  if (group !== GROUP || !version || !/^[A-Za-z0-9]+$/.test(kind + version)) {
    return { error: `not a ${GROUP} object: apiVersion ${obj.apiVersion}, kind ${obj.kind}` };
  }
  const file = join(modules, PACKAGE, group, version, `${kind}.js`);
  const where = `${PACKAGE}/${group}/${version}/${kind}`;
  if (!existsSync(file)) return { error: `no model ${where} in ${PACKAGE}` };
  const Model = (await import(pathToFileURL(file).href))[kind];
  if (typeof Model !== "function" || Model.kind !== kind || Model.apiVersion !== obj.apiVersion) {
    return { error: `${where} is not the model of ${obj.apiVersion} ${kind}` };
  }
  return { Model, where };
}

function schemaErrors(err) {
  if (!Array.isArray(err?.errors)) throw err; // not a validation error: a bug, surface it
  return err.errors.map((e) => `${e.instancePath || "/"}: ${e.message}`);
}

// A deep copy of `value` whose objects record which keys were read.
function tracked(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map((v, i) => tracked(v, `${path}/${i}`, seen));
  const entry = { path, keys: Object.keys(value), read: new Set(), enumerated: false };
  seen.push(entry);
  const copy = {};
  for (const key of entry.keys) copy[key] = tracked(value[key], `${path}/${key}`, seen);
  return new Proxy(copy, {
    get(target, key, receiver) {
      if (typeof key === "string") entry.read.add(key);
      return Reflect.get(target, key, receiver);
    },
    has(target, key) {
      if (typeof key === "string") entry.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      entry.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(Model, obj) {
  const seen = [];
  try {
    Model.prototype.validate.call(tracked(obj, "", seen));
  } catch (err) {
    schemaErrors(err); // the verdict is reported by the untracked run
  }
  const [root] = seen;
  if (!root || root.read.size === 0) return ["/: the validator read no field, field names cannot be checked"];
  const unknown = [];
  for (const entry of seen) {
    if (entry.enumerated || entry.read.size === 0) continue;
    for (const key of entry.keys) if (!entry.read.has(key)) unknown.push(`${entry.path}/${key}`);
  }
  return unknown;
}

async function check(modules, obj) {
  const result = { kind: obj?.kind ?? null, name: obj?.metadata?.name ?? null, model: null, errors: [], unknownFields: [] };
  const found = await modelFor(modules, obj ?? {});
  if (found.error) {
    result.errors.push(found.error);
    return result;
  }
  result.model = found.where;
  try {
    new found.Model(obj).validate();
  } catch (err) {
    result.errors = schemaErrors(err);
  }
  result.unknownFields = unknownFields(found.Model, obj);
  return result;
}

const modules = process.argv[2];
if (!modules || !existsSync(join(modules, PACKAGE, "package.json"))) {
  console.error(`usage: node validate.mjs NODE_MODULES_DIR < objects.json (no ${PACKAGE} under ${modules})`);
  process.exit(2);
}
const objects = JSON.parse(readFileSync(0, "utf8"));
if (!Array.isArray(objects)) {
  console.error("stdin must be a JSON array of objects");
  process.exit(2);
}
const results = [];
for (const obj of objects) results.push(await check(modules, obj));
process.stdout.write(JSON.stringify(results, null, 1) + "\n");
process.exit(results.every((r) => r.errors.length === 0 && r.unknownFields.length === 0) ? 0 : 1);
