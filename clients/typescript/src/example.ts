// A TypeScript client of agentplane: the services come from the repository's
// proto/ files (loaded with @grpc/proto-loader, as any language's stubs are
// generated from them). It spawns a named agent, reads its output, stops and
// deletes it.
//
//   AGENTPLANE_ENDPOINT=http://127.0.0.1:7700 npm run example
//   (https:// endpoints also take AGENTPLANE_CA and AGENTPLANE_TOKEN_FILE)

import * as fs from "fs";
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_DIR = path.resolve(__dirname, "../../../proto");

function client(): any {
  const def = protoLoader.loadSync("agentplane/v1/agent_service.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const pkg: any = grpc.loadPackageDefinition(def);
  const endpoint = process.env.AGENTPLANE_ENDPOINT ?? "http://127.0.0.1:7700";
  const url = new URL(endpoint);
  let creds: grpc.ChannelCredentials;
  if (url.protocol === "https:") {
    const ssl = grpc.credentials.createSsl(fs.readFileSync(process.env.AGENTPLANE_CA ?? ""));
    const tokenFile = process.env.AGENTPLANE_TOKEN_FILE;
    creds = tokenFile
      ? grpc.credentials.combineChannelCredentials(
          ssl,
          grpc.credentials.createFromMetadataGenerator((_params, callback) => {
            const md = new grpc.Metadata();
            const token = fs.readFileSync(tokenFile, "utf8").split("\n")[0].trim();
            md.set("authorization", `Bearer ${token}`);
            callback(null, md);
          }),
        )
      : ssl;
  } else {
    creds = grpc.credentials.createInsecure();
  }
  return new pkg.agentplane.v1.AgentService(url.host, creds);
}

function unary<T>(c: any, method: string, req: object): Promise<T> {
  return new Promise((resolve, reject) =>
    c[method](req, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res))),
  );
}

async function main(): Promise<void> {
  const c = client();
  const spawned: any = await unary(c, "SpawnAgent", {
    spec: { name: "ts-example", argv: ["sh", "-c", "echo hello from typescript; exec sleep 1000"] },
  });
  console.log(`spawned ${spawned.agent.spec.name} (${spawned.agent.id}) on ${spawned.agent.host}: ${spawned.agent.state}`);
  // Names work wherever an id does; read what it wrote so far, until the line is there.
  let out = "";
  for (let i = 0; i < 50 && !out.includes("\n"); i++) {
    out = await new Promise<string>((resolve, reject) => {
      let text = "";
      const stream = c.StreamLogs({ id: "ts-example" });
      stream.on("data", (chunk: any) => (text += Buffer.from(chunk.data).toString()));
      stream.on("end", () => resolve(text));
      stream.on("error", reject);
    });
    if (!out.includes("\n")) await new Promise((r) => setTimeout(r, 100));
  }
  process.stdout.write(out);
  const stopped: any = await unary(c, "StopAgent", { id: "ts-example" });
  console.log(`stopped: ${stopped.state}`);
  await unary(c, "DeleteAgent", { id: "ts-example" });
  c.close();
}

main().catch((e) => {
  console.error(`example failed: ${e.message ?? e}`);
  process.exit(1);
});
