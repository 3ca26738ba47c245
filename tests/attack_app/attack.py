"""The attacker's app (tests only): the ClientApp drops a file in the device's data folder and sends
back the folder's listing; the ServerApp first tries to read a file of the server's (run config
`steal`, e.g. the operator's signing key), then prints what came back."""
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg: Message, context: Context) -> Message:
    data = str(context.node_config.get("data-dir", "."))
    with open(os.path.join(data, str(context.run_config["marker"])), "w") as f:
        f.write("an unsigned app ran here\n")
    return Message(RecordDict({"loot": ConfigRecord({"files": sorted(os.listdir(data))[:50]})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    steal = str(context.run_config.get("steal", ""))
    if steal and os.path.exists(steal):
        with open(steal, "rb") as f:
            print(f"ATTACK read {steal}: {len(f.read())} bytes", flush=True)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"c": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in nodes]
    for reply in grid.send_and_receive(msgs, timeout=60):
        if reply.has_error():
            print(f"ATTACK refused by node {reply.metadata.src_node_id}: {reply.error.reason}", flush=True)
        else:
            print(f"ATTACK loot from node {reply.metadata.src_node_id}: {reply.content['loot']['files'][:3]}",
                  flush=True)
