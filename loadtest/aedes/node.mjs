// One Aedes node of a Redis-backed cluster, for mcloudtt-bench's head-to-head.
//
//   node node.mjs --modules DIR/node_modules --port 1883 --redis-port 6379 --id aedes-0
//
// Aedes clusters through Redis with mqemitter-redis (messages between nodes) and
// aedes-persistence-redis (retained messages, subscriptions, sessions), as its users run it.
// The packages live in a cache folder, not next to this file, so they are resolved from
// --modules. Prints "ready" once listening.
import net from 'node:net'
import path from 'node:path'
import { createRequire } from 'node:module'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

const { values } = parseArgs({
  options: {
    modules: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '1883' },
    'redis-host': { type: 'string', default: '127.0.0.1' },
    'redis-port': { type: 'string', default: '6379' },
    id: { type: 'string', default: 'aedes-0' }
  }
})

const require = createRequire(path.join(path.resolve(values.modules), 'resolve-from-here.js'))
const { Aedes } = await import(pathToFileURL(require.resolve('aedes')).href)
const mqemitterRedis = require('mqemitter-redis')
const persistenceRedis = require('aedes-persistence-redis')

const redis = { host: values['redis-host'], port: Number(values['redis-port']) }
const broker = await Aedes.createBroker({
  id: values.id,
  mq: mqemitterRedis(redis),
  persistence: persistenceRedis(redis)
})
const server = net.createServer(broker.handle)
server.listen(Number(values.port), values.host, () => {
  console.log('ready')
})

function stop () {
  server.close()
  broker.close(() => process.exit(0))
  setTimeout(() => process.exit(0), 2000).unref()
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
