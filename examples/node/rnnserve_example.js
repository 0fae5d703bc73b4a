// rnnserve from Node.js, on the gRPC contract alone (proto/rnnserve/v1/rnnserve.proto): list the
// models, open a session, stream steps on one bidirectional call, retry one chunk the way an app
// does after a lost reply, and close the session.
//
//   npm ci
//   node rnnserve_example.js --server 127.0.0.1:50051 --model char-gru --text "In the beginning"
//   node rnnserve_example.js --model co2-gru --values 315.7,317.4,317.5,317.3
//
// Tensors travel as dtype + shape + little-endian bytes (raw_data): token ids as int64, features
// as float32 [T, F]. Every chunk carries seq, the index of its first step; sending the last chunk
// again with the same seq and inputs is answered from the server's cache and not applied twice.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = process.env.RNNSERVE_PROTO ||
  path.join(__dirname, '..', '..', 'proto', 'rnnserve', 'v1', 'rnnserve.proto');
const NEXT_SEQ_KEY = 'rnnserve-next-seq'; // trailing metadata of a seq error: what to send next

function parseArgs(argv) {
  const args = { server: '127.0.0.1:50051', model: 'char-gru', text: 'In the beginning',
    values: '', chunk: 4 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in args) || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]}; options: --server HOST:PORT ` +
        '--model NAME --text TEXT (text models) --values V1,V2,... (feature models) --chunk N');
    }
    args[key] = key === 'chunk' ? Number(argv[i + 1]) : argv[i + 1];
  }
  return args;
}

function loadService(server) {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const { InferenceService } = grpc.loadPackageDefinition(definition).rnnserve.v1;
  return new InferenceService(server, grpc.credentials.createInsecure());
}

// One promise per unary call; a deadline so a server that is down fails fast.
function call(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 5000);
    client[method](request, metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// token ids -> int64 [T]
function tokensTensor(ids) {
  const raw = Buffer.alloc(8 * ids.length);
  ids.forEach((id, i) => raw.writeBigInt64LE(BigInt(id), 8 * i));
  return { dtype: 'DTYPE_INT64', shape: [ids.length], raw_data: raw };
}

// rows of features -> float32 [T, F]
function featuresTensor(rows) {
  const width = rows[0].length;
  const raw = Buffer.alloc(4 * rows.length * width);
  rows.flat().forEach((v, i) => raw.writeFloatLE(v, 4 * i));
  return { dtype: 'DTYPE_FLOAT32', shape: [rows.length, width], raw_data: raw };
}

// float32 [T, O] -> array of T rows
function decodeOutputs(tensor) {
  if (tensor.dtype !== 'DTYPE_FLOAT32') throw new Error(`unexpected output dtype ${tensor.dtype}`);
  const [steps, width] = tensor.shape;
  const rows = [];
  for (let t = 0; t < steps; t++) {
    const row = [];
    for (let j = 0; j < width; j++) row.push(tensor.raw_data.readFloatLE(4 * (t * width + j)));
    rows.push(row);
  }
  return rows;
}

// The chunks to send: text split into runs of `size` characters (as token ids), or values grouped
// into steps of the model's feature count and then into chunks of `size` steps.
function makeChunks(model, args) {
  const chunks = [];
  if (model.input_kind === 'INPUT_KIND_TOKENS') {
    const ids = [...args.text].map((ch, i) => {
      const id = model.vocabulary.indexOf(ch);
      if (id < 0) throw new Error(`${JSON.stringify(ch)} (position ${i}) is not in ${model.name}'s vocabulary`);
      return id;
    });
    for (let i = 0; i < ids.length; i += args.chunk) chunks.push(tokensTensor(ids.slice(i, i + args.chunk)));
  } else {
    const width = Number(model.input.shape[model.input.shape.length - 1]);
    const values = args.values.split(',').filter((v) => v.trim() !== '').map(Number);
    if (values.length === 0 || values.length % width !== 0) {
      throw new Error(`${model.name} takes ${width} value(s) per step: give --values with a multiple of ${width}`);
    }
    const rows = [];
    for (let i = 0; i < values.length; i += width) rows.push(values.slice(i, i + width));
    for (let i = 0; i < rows.length; i += args.chunk) chunks.push(featuresTensor(rows.slice(i, i + args.chunk)));
  }
  return chunks;
}

// What one step's output says: the likeliest next symbol for a text model, the value otherwise.
function describe(model, row) {
  if (model.output_kind === 'OUTPUT_KIND_LOGITS') {
    const best = row.indexOf(Math.max(...row));
    return `likeliest next ${JSON.stringify(model.vocabulary[best] ?? best)}`;
  }
  return `output ${row.map((v) => v.toPrecision(6)).join(' ')}`;
}

// Send every chunk on one bidirectional Stream, one after the other; resolves with the replies.
function streamChunks(client, metadata, sessionId, chunks) {
  return new Promise((resolve, reject) => {
    const stream = client.Stream(metadata);
    const replies = [];
    let seq = 0;
    const send = (i) => {
      stream.write({ request_id: i + 1, step: { session_id: sessionId, seq, inputs: chunks[i] } });
      seq += chunks[i].shape[0];
    };
    stream.on('data', (reply) => {
      // An error about one chunk comes back in-band (StepError) and the stream goes on.
      if (reply.result === 'error') {
        stream.cancel();
        reject(new Error(`chunk ${reply.request_id}: ${reply.error.message}`));
        return;
      }
      replies.push(reply.step);
      if (replies.length < chunks.length) send(replies.length);
      else stream.end();
    });
    stream.on('error', (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
    stream.on('end', () => resolve(replies));
    send(0);
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = loadService(args.server);

  const { models } = await call(client, 'ListModels', {});
  console.log(`${models.length} models on ${args.server}:`);
  for (const m of models) console.log(`  ${m.name}/${m.version}  ${m.cell}  ${m.input_kind.replace('INPUT_KIND_', '').toLowerCase()}  on ${m.provider}`);
  const model = models.find((m) => m.name === args.model);
  if (!model) throw new Error(`model ${args.model} is not served; pick one of the above with --model`);
  const chunks = makeChunks(model, args);

  // A route key of our choosing, sent on every call of the session from OpenSession on: behind a
  // proxy (Envoy) it sends all of them to one replica; a single server ignores it.
  const metadata = new grpc.Metadata();
  metadata.set('x-rnnserve-route', crypto.randomBytes(9).toString('base64url'));
  const { session } = await call(client, 'OpenSession', { model: model.name }, metadata);
  console.log(`session on ${session.model}/${session.version}`);
  try {
    const replies = await streamChunks(client, metadata, session.session_id, chunks);
    let step = 0;
    for (const reply of replies) {
      for (const row of decodeOutputs(reply.outputs)) console.log(`step ${step++}: ${describe(model, row)}`);
    }
    const last = replies[replies.length - 1];

    // The reply to the last chunk was "lost": send it again, same seq, same inputs.
    const again = await call(client, 'Step', { session_id: session.session_id, seq: last.seq,
      inputs: chunks[chunks.length - 1] }, metadata);
    const same = again.outputs.raw_data.equals(last.outputs.raw_data);
    console.log(`retry of seq ${last.seq}: ${same ? 'same outputs' : 'DIFFERENT outputs'}, ` +
      `next_seq ${again.next_seq} (applied once)`);

    // A chunk that skips steps is refused, and the error says which seq to send.
    const gap = again.next_seq + 1;
    try {
      await call(client, 'Step', { session_id: session.session_id, seq: gap, inputs: chunks[0] }, metadata);
      throw new Error(`seq ${gap} was accepted`);
    } catch (err) {
      if (err.code !== grpc.status.FAILED_PRECONDITION) throw err;
      console.log(`seq ${gap}: ${grpc.status[err.code]}; the server expects seq ${err.metadata.get(NEXT_SEQ_KEY)[0]}`);
    }
  } finally {
    await call(client, 'CloseSession', { session_id: session.session_id }, metadata);
    client.close();
  }
}

main().catch((err) => {
  console.error(`rnnserve_example: ${err.details || err.message}`);
  process.exit(1);
});
