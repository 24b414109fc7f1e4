/*
 * An OpAMP agent on @elastic/opamp-client-node, driven by tests/test_opamp_node.py.
 *
 * Settings come from the environment (OPAMP_ENDPOINT, OPAMP_TOKEN,
 * OPAMP_INSTANCE_UID as 32 hex digits, OPAMP_HEARTBEAT_SECONDS, and
 * OPAMP_IDENTIFYING / OPAMP_NON_IDENTIFYING as JSON objects), so the token
 * is not on the command line. Every event is one JSON line on stdout (the
 * test reads them in order); the client's own warnings and errors go to
 * stderr. One command is read from stdin: {"cmd": "shutdown"} calls
 * client.shutdown() (what a process does on a clean exit) and exits.
 *
 * What this agent does with a remote configuration is what a JSON-configured
 * SDK (like EDOT Node.js) does: it applies JSON files and reports APPLIED
 * with the offered hash; a file of any other type makes it report FAILED.
 * The same hash offered again is ignored (the client's README asks for
 * that: the server offers it on every reply until it is reported).
 */

'use strict';

const diagch = require('diagnostics_channel');
const readline = require('readline');

const {
    createOpAMPClient,
    AgentCapabilities,
    RemoteConfigStatuses,
    DIAG_CH_SEND_SUCCESS,
    DIAG_CH_SEND_FAIL,
    USER_AGENT,
} = require('@elastic/opamp-client-node');

function emit(event) {
    // Writes to a pipe are synchronous on Linux: a line printed is a line
    // the test gets, even if the process is killed right after.
    process.stdout.write(
        JSON.stringify(event, (_k, v) => (typeof v === 'bigint' ? Number(v) : v)) + '\n'
    );
}

function hex(bytes) {
    return bytes ? Buffer.from(bytes).toString('hex') : null;
}

const STATUS_NAMES = {
    [RemoteConfigStatuses.RemoteConfigStatuses_UNSET]: 'unset',
    [RemoteConfigStatuses.RemoteConfigStatuses_APPLIED]: 'applied',
    [RemoteConfigStatuses.RemoteConfigStatuses_APPLYING]: 'applying',
    [RemoteConfigStatuses.RemoteConfigStatuses_FAILED]: 'failed',
};

// The parts of an AgentToServer beyond the three the client always sets
// (instance_uid, sequence_num, capabilities).
const PARTS = [
    'agentDescription',
    'health',
    'effectiveConfig',
    'remoteConfigStatus',
    'agentDisconnect',
];

function sent(a2s) {
    const out = {seq: a2s.sequenceNum, parts: PARTS.filter((p) => a2s[p] !== undefined)};
    if (a2s.remoteConfigStatus) {
        out.remote_config_status = {
            hash: hex(a2s.remoteConfigStatus.lastRemoteConfigHash),
            status: STATUS_NAMES[a2s.remoteConfigStatus.status],
            error: a2s.remoteConfigStatus.errorMessage,
        };
    }
    return out;
}

const stderrLog = {
    trace() {},
    debug() {},
    info() {},
    warn(...args) {
        process.stderr.write('warn ' + JSON.stringify(args.map(String)) + '\n');
    },
    error(...args) {
        process.stderr.write('error ' + JSON.stringify(args.map(String)) + '\n');
    },
};

const env = process.env;
let applied = null; // the hash last handled

const client = createOpAMPClient({
    log: stderrLog,
    endpoint: env.OPAMP_ENDPOINT,
    headers: {Authorization: `Bearer ${env.OPAMP_TOKEN}`},
    instanceUid: new Uint8Array(Buffer.from(env.OPAMP_INSTANCE_UID, 'hex')),
    heartbeatIntervalSeconds: Number(env.OPAMP_HEARTBEAT_SECONDS),
    capabilities:
        AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig |
        AgentCapabilities.AgentCapabilities_ReportsRemoteConfig,
    diagEnabled: true,
    onMessage({remoteConfig}) {
        if (!remoteConfig) {
            return;
        }
        const hash = hex(remoteConfig.configHash);
        if (hash === applied) {
            return;
        }
        applied = hash;
        const files = {};
        let error = '';
        for (const [name, file] of Object.entries(remoteConfig.config?.configMap ?? {})) {
            const body = Buffer.from(file.body).toString('utf8');
            files[name] = {body, content_type: file.contentType};
            if (!/json/.test(file.contentType)) {
                error ||= `${name}: unsupported content type ${JSON.stringify(file.contentType)}`;
                continue;
            }
            try {
                JSON.parse(body);
            } catch (err) {
                error ||= `${name}: ${err.message}`;
            }
        }
        emit({event: 'remote_config', hash, files});
        client.setRemoteConfigStatus({
            lastRemoteConfigHash: remoteConfig.configHash,
            status: error
                ? RemoteConfigStatuses.RemoteConfigStatuses_FAILED
                : RemoteConfigStatuses.RemoteConfigStatuses_APPLIED,
            errorMessage: error,
        });
        emit({event: error ? 'failed' : 'applied', hash, error});
    },
});

diagch.subscribe(DIAG_CH_SEND_SUCCESS, ({a2s, s2a}) => {
    emit({
        event: 'sent',
        ...sent(a2s),
        reply_flags: s2a.flags,
        offer: hex(s2a.remoteConfig?.configHash),
    });
});
diagch.subscribe(DIAG_CH_SEND_FAIL, ({a2s, err, retryAfterMs}) => {
    emit({event: 'send_failed', ...sent(a2s), error: String(err), retry_after_ms: retryAfterMs});
});

client.setAgentDescription({
    identifyingAttributes: JSON.parse(env.OPAMP_IDENTIFYING),
    nonIdentifyingAttributes: JSON.parse(env.OPAMP_NON_IDENTIFYING || '{}'),
});
client.start();
emit({event: 'started', instance_uid: hex(client.getInstanceUid()), user_agent: USER_AGENT});

readline.createInterface({input: process.stdin}).on('line', async (line) => {
    const {cmd} = JSON.parse(line);
    if (cmd === 'shutdown') {
        await client.shutdown();
        emit({event: 'shutdown'});
        process.exit(0);
    }
});
